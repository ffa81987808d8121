"""Draws docs/images/architecture.png: what flows where in a ZAYA1 layer stack (the README's picture).

    python scripts/architecture_figure.py
"""

from __future__ import annotations

import pathlib

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

OUT = pathlib.Path(__file__).resolve().parents[1] / "docs" / "images" / "architecture.png"

COLORS = {"io": "#e8e8e8", "norm": "#fff2cc", "attn": "#dae8fc", "moe": "#d5e8d4", "scale": "#f8cecc",
          "state": "#e1d5e7"}


def box(ax, x, y, w, h, text, kind, size=9):
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                facecolor=COLORS[kind], edgecolor="#444444", linewidth=1))
    ax.text(x, y, text, ha="center", va="center", fontsize=size, wrap=True)


def arrow(ax, start, end, style="-|>", color="#333333", dashed=False, rad=0.0):
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=12, color=color, linewidth=1.2,
                                 linestyle="--" if dashed else "-", connectionstyle=f"arc3,rad={rad}"))


def main() -> None:
    fig = Figure(figsize=(11, 8.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 11)
    ax.set_ylim(0, 8.5)
    ax.axis("off")

    x = 3.2
    box(ax, x, 8.0, 3.6, 0.45, "token ids  [B, T]", "io")
    box(ax, x, 7.3, 3.6, 0.5, "embedding (tied)  ->  (e + b_in) * s_in\nfloat32 residual stream  [B, T, 2048]", "io", 8.5)
    ax.add_patch(FancyBboxPatch((0.5, 0.9), 5.4, 5.9, boxstyle="round,pad=0.05", facecolor="none",
                                edgecolor="#888888", linestyle="--"))
    ax.text(3.6, 6.62, "x 40 layers (stacked, one lax.scan)", fontsize=9, color="#555555")
    box(ax, x, 6.15, 3.6, 0.4, "RMSNorm", "norm")
    box(ax, x, 5.35, 3.6, 0.8, "CCA attention\n8 query / 2 KV heads of 128 in a compressed latent", "attn", 8.5)
    box(ax, x, 4.55, 3.6, 0.45, "residual scaling  (h + b_h) s_h + (r + b_r) s_r", "scale", 8.5)
    box(ax, x, 3.85, 3.6, 0.4, "RMSNorm", "norm")
    box(ax, x, 3.05, 3.6, 0.75, "router: down-proj 256 + EDA, RMSNorm, MLP,\nsoftmax over 17 classes (+ balancing bias)",
        "moe", 8.5)
    box(ax, x, 2.2, 3.6, 0.6, "top-1: one of 16 SwiGLU experts, or skip\noutput x router probability", "moe", 8.5)
    box(ax, x, 1.2, 3.6, 0.4, "residual scaling", "scale", 8.5)
    box(ax, x, 0.4, 3.6, 0.45, "RMSNorm -> tied LM head -> float32 logits", "io", 8.5)
    for y0, y1 in ((7.78, 7.55), (7.05, 6.35), (5.95, 5.75), (4.95, 4.78), (4.33, 4.05), (3.65, 3.43),
                   (2.68, 2.5), (1.9, 1.4), (1.0, 0.63)):
        arrow(ax, (x, y0), (x, y1))
    # The residual stream bypasses each sublayer into its residual scaling.
    rx = 1.05
    for top, bottom in ((6.5, 4.55), (4.2, 1.2)):
        ax.plot([x, rx, rx], [top, top, bottom], color="#333333", linewidth=1.2)
        arrow(ax, (rx, bottom), (x - 1.8, bottom))
    ax.text(rx - 0.3, 5.5, "residual", fontsize=8, rotation=90, color="#555555")
    ax.text(rx - 0.3, 2.6, "residual", fontsize=8, rotation=90, color="#555555")

    # CCA detail.
    cx = 8.3
    box(ax, cx, 7.45, 4.6, 0.5, "q = x W_q, k = x W_k  (compressed: 8 x 128, 2 x 128)", "attn", 8.5)
    box(ax, cx, 6.75, 4.6, 0.5, "causal depthwise conv, then grouped per-head conv on [q | k]\n(kernels 2 and 2)",
        "attn", 8)
    box(ax, cx, 6.05, 4.6, 0.45, "q-k mean per GQA group; L2 QK-norm, key temperature", "attn", 8.5)
    box(ax, cx, 5.4, 4.6, 0.45, "partial RoPE: first 64 dims of each head (theta 5e6)", "attn", 8.5)
    box(ax, cx, 4.7, 4.6, 0.5, "v = [x_t W_v,cur | x_(t-1) W_v,del]  (value shift)\ncausal GQA softmax attention, o_proj",
        "attn", 8)
    for y0, y1 in ((7.2, 7.0), (6.5, 6.28), (5.82, 5.63), (5.17, 4.95)):
        arrow(ax, (cx, y0), (cx, y1))
    arrow(ax, (cx - 2.3, 5.35), (x + 1.8, 5.35), dashed=True, color="#6c8ebf")

    # Router detail: EDA carries state between layers; the PID balancer sets the bias outside the gradient.
    box(ax, cx, 3.3, 4.6, 0.55, "EDA: router state of layer l-1 x learned scale\nadded before the router MLP of layer l",
        "state", 8.5)
    box(ax, cx, 2.45, 4.6, 0.55, "PID balancer (training, not a gradient):\nbias += AdamW step on (load - 1/16)", "state",
        8.5)
    box(ax, cx, 1.6, 4.6, 0.45, "cache per layer: K, V [B, 2, T, 128], conv state, v state", "state", 8.5)
    arrow(ax, (cx - 2.3, 3.3), (x + 1.8, 3.1), dashed=True, color="#9673a6")
    arrow(ax, (cx - 2.3, 2.45), (x + 1.8, 2.95), dashed=True, color="#9673a6")
    arrow(ax, (cx - 2.3, 1.6), (x + 1.8, 5.2), dashed=True, color="#9673a6", rad=-0.25)

    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
