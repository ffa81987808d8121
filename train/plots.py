"""PNG plots of a training run: loss curve, expert load, balancer biases and routing entropy.

Shapes (N = logged snapshots, L = MoE layers, E = experts; `steps` is always [N], strictly increasing):
    plot_loss_curve(steps [N], losses [N], path, eval_points {step: value}, validation {step: loss},
                    learning_rates [N])                         raw loss + EMA and validation loss, eval metric on a
                                                                2nd axis, learning rate in a panel below
    plot_expert_load_heatmap(loads [N, L, E], steps [N], path)  per layer: experts (y) x steps (x), shared colorbar
    plot_final_expert_load(load [L, E], path)                   layers x experts heatmap, values annotated if small
    plot_balancer_biases(biases [N, L, E], steps [N], path)     each expert's bias over steps, one panel per layer
    plot_routing_entropy(entropy [N, L], steps [N], path)       normalised entropy per layer in [0, 1]

Loads are fractions of (expert-routed) tokens per expert, so a balanced layer sits at 1/E everywhere; the load
heatmaps use a diverging colour map centred on 1/E (white = balanced, red = over-used, blue = under-used).

matplotlib is imported inside the functions, so importing `train` does not need it. Figures are built with the
object-oriented API on an explicit Agg canvas (`matplotlib.figure.Figure` + `FigureCanvasAgg`): nothing is
registered with pyplot, so no global backend switch happens in the caller's process and no figure can leak, even
when saving raises. Every function validates its inputs (ValueError naming the argument and the expected shape)
and creates the PNG's parent directory.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_DPI = 100


def _new_figure(width: float, height: float) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str | os.PathLike) -> None:
    path = os.fspath(path)
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    try:
        fig.savefig(path, format="png", dpi=_DPI)
    finally:
        fig.clear()  # drop artists now instead of waiting for the cycle collector (big grids hold a lot)


def _array(name: str, value: object, ndim: int, expected: str) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name}: expected a numeric array of shape {expected}, got {value!r:.80}") from err
    if array.ndim != ndim or array.size == 0:
        raise ValueError(f"{name}: expected shape {expected} with no empty axis, got {array.shape}")
    return array


def _steps(steps: Sequence[int], count: int, expected: str) -> np.ndarray:
    array = _array("steps", steps, 1, expected)
    if array.shape[0] != count:
        raise ValueError(f"steps: expected shape {expected} = ({count},), got {array.shape}")
    if count > 1 and not np.all(np.diff(array) > 0):
        raise ValueError("steps: must be strictly increasing")
    return array


def _grid(num_panels: int) -> tuple[int, int]:
    """(rows, cols): a single column for a few layers, a near-square grid for many (a 40-row column is unreadable)."""
    if num_panels <= 4:
        return num_panels, 1
    cols = math.ceil(math.sqrt(num_panels))
    return math.ceil(num_panels / cols), cols


def _panel_axes(fig: Figure, num_panels: int, *, sharey: bool = True) -> list[Axes]:
    rows, cols = _grid(num_panels)
    axes = fig.subplots(rows, cols, sharex=True, sharey=sharey, squeeze=False).ravel()
    for ax in axes[num_panels:]:
        ax.set_visible(False)
    return list(axes[:num_panels])


def _ema(values: np.ndarray, smoothing: float) -> np.ndarray:
    """Bias-corrected EMA (as TensorBoard's smoothing); non-finite points are skipped so one NaN does not
    poison the rest of the curve."""
    out = np.full_like(values, np.nan)
    accum, weight = 0.0, 0.0
    for i, value in enumerate(values):
        if math.isfinite(value):
            accum = smoothing * accum + (1.0 - smoothing) * value
            weight = smoothing * weight + (1.0 - smoothing)
        if weight > 0:
            out[i] = accum / weight
    return out


def _load_norm(values: np.ndarray, num_experts: int):
    from matplotlib.colors import TwoSlopeNorm

    uniform = 1.0 / num_experts
    finite = values[np.isfinite(values)]
    top = float(finite.max()) if finite.size else 0.0
    # At least 2/E so the colour scale is symmetric around 1/E and a well-balanced run does not get its tiny
    # deviations stretched into full red/blue.
    return TwoSlopeNorm(vcenter=uniform, vmin=0.0, vmax=max(top, 2.0 * uniform, uniform * 1.0001))


def _load_colorbar(fig: Figure, mappable, axes, norm, num_experts: int, shrink: float = 1.0) -> None:
    from matplotlib.ticker import MaxNLocator

    uniform = 1.0 / num_experts
    # The two halves of the diverging scale are linear with different slopes, so the default locator leaves the
    # [0, 1/E] half almost without ticks; place them by hand on both sides of the uniform load.
    # Upper ticks keep a fifth of that half clear above 1/E so their labels do not overprint the 1/E label.
    clear_above = uniform + 0.2 * (norm.vmax - uniform)
    upper = [t for t in MaxNLocator(nbins=5).tick_values(uniform, norm.vmax) if clear_above < t <= norm.vmax]
    cbar = fig.colorbar(mappable, ax=axes, shrink=shrink, ticks=[0.0, uniform / 2.0, uniform, *upper])
    cbar.ax.set_yticklabels([f"{t:.3g}" for t in cbar.get_ticks()])
    cbar.set_label("fraction of tokens (line: uniform 1/E)")
    cbar.ax.axhline(uniform, color="black", linewidth=1.0)


def _edges(centres: np.ndarray) -> np.ndarray:
    """Cell edges around each step, so uneven logging intervals are drawn to scale."""
    if centres.size == 1:
        return np.array([centres[0] - 0.5, centres[0] + 0.5])
    mids = (centres[1:] + centres[:-1]) / 2.0
    return np.concatenate([[2 * centres[0] - mids[0]], mids, [2 * centres[-1] - mids[-1]]])


def plot_loss_curve(
    steps: Sequence[int],
    losses: Sequence[float],
    path: str | os.PathLike,
    eval_points: dict[int, float] | None = None,
    title: str = "Training loss",
    *,
    eval_label: str = "held-out accuracy",
    smoothing: float | None = None,
    validation: dict[int, float] | None = None,
    learning_rates: Sequence[float] | None = None,
) -> None:
    """Raw training loss (faint) with its EMA over steps; optional validation loss on the same axis (same units),
    optional eval metric (e.g. accuracy) on a second y-axis, and optional learning rate in a panel below.

    steps [N], losses [N], learning_rates [N]; eval_points and validation map step -> value. `smoothing` is the EMA
    decay in [0, 1); None picks 1 - 10/N clipped to [0, 0.95], i.e. an averaging window of about a tenth of the
    logged points.
    """
    loss = _array("losses", losses, 1, "[N]")
    step = _steps(steps, loss.shape[0], "[N] (one per loss)")
    lr = None if learning_rates is None else _array("learning_rates", learning_rates, 1, "[N] (one per loss)")
    if lr is not None and lr.shape != loss.shape:
        raise ValueError(f"learning_rates: expected shape [N] = {list(loss.shape)} (one per loss), "
                         f"got {list(lr.shape)}")
    if smoothing is None:
        # A fixed decay such as TensorBoard's 0.9 lags far behind a short run's steep early descent (30 logged
        # points) while barely smoothing a long one; tie the window to the number of points instead.
        smoothing = float(np.clip(1.0 - 10.0 / loss.size, 0.0, 0.95))
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"smoothing: expected a value in [0, 1), got {smoothing}")

    fig = _new_figure(8.0, 4.5 if lr is None else 6.5)
    if lr is None:
        ax = fig.add_subplot()
    else:
        ax, lr_ax = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
        lr_ax.plot(step, lr, color="tab:green", linewidth=1.5)
        lr_ax.set_ylabel("learning rate")
        lr_ax.set_xlabel("training step")
        lr_ax.grid(True, alpha=0.3)
    ax.plot(step, loss, color="tab:blue", alpha=0.3, linewidth=1.0, marker="." if loss.size <= 200 else None,
            label="loss")
    ax.plot(step, _ema(loss, smoothing), color="tab:blue", linewidth=2.0, label=f"EMA (decay {smoothing:.2f})")
    if validation:
        val_steps = sorted(validation)
        ax.plot(val_steps, [validation[k] for k in val_steps], color="tab:red", marker="s", linewidth=1.5,
                label="validation loss")
    if lr is None:
        ax.set_xlabel("training step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if eval_points:
        eval_steps = np.array(sorted(eval_points), dtype=np.float64)
        eval_values = np.array([eval_points[k] for k in sorted(eval_points)], dtype=np.float64)
        twin = ax.twinx()
        twin.plot(eval_steps, eval_values, color="tab:orange", marker="o", linestyle="--", label=eval_label)
        for x, y in zip(eval_steps, eval_values):
            twin.annotate(f"{y:.3g}", (x, y), textcoords="offset points", xytext=(0, 6), ha="center",
                          color="tab:orange", fontsize=8)
        twin.set_ylabel(eval_label, color="tab:orange")
        twin.tick_params(axis="y", colors="tab:orange")
        finite = eval_values[np.isfinite(eval_values)]
        if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
            twin.set_ylim(0.0, 1.05)  # a probability-like metric reads best on its full range
        more_handles, more_labels = twin.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, loc="upper right")
    _save(fig, path)


def plot_expert_load_heatmap(
    loads: np.ndarray, steps: Sequence[int], path: str | os.PathLike, title: str = "Expert load per layer"
) -> None:
    """Per-layer heatmaps of expert load (fraction of tokens) over training: experts (y) x steps (x).

    loads [N, L, E], steps [N]. One panel per layer (a grid when there are many), one shared colorbar.
    """
    load = _array("loads", loads, 3, "[num_snapshots, num_layers, num_experts]")
    step = _steps(steps, load.shape[0], "[num_snapshots]")
    _, num_layers, num_experts = load.shape
    rows, cols = _grid(num_layers)
    fig = _new_figure(3.6 * cols + 1.6, max(2.0, 0.12 * num_experts + 1.2) * rows + 1.0)
    axes = _panel_axes(fig, num_layers)
    norm = _load_norm(load, num_experts)
    x_edges = _edges(step)
    y_edges = np.arange(num_experts + 1) - 0.5
    mesh = None
    for layer, ax in enumerate(axes):
        mesh = ax.pcolormesh(x_edges, y_edges, np.ma.masked_invalid(load[:, layer, :].T), cmap="RdBu_r",
                             norm=norm, shading="flat")
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.set_ylim(num_experts - 0.5, -0.5)  # expert 0 on top, as in a matrix
    _integer_ticks(axes[0].yaxis)
    fig.supxlabel("training step")
    fig.supylabel("expert")
    fig.suptitle(f"{title} (uniform load = 1/E = 1/{num_experts} = {1.0 / num_experts:.3g})")
    _load_colorbar(fig, mesh, axes, norm, num_experts, shrink=0.9 if num_layers > 1 else 1.0)
    _save(fig, path)


def _integer_ticks(axis) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(nbins=8, integer=True))


def plot_final_expert_load(
    load: np.ndarray, path: str | os.PathLike, title: str = "Final expert load", *, annotate_max_cells: int = 256
) -> None:
    """Layers (y) x experts (x) heatmap of one snapshot's expert load [L, E]; cell values (in %) are written in
    when there are at most `annotate_max_cells` cells (beyond that the text is unreadable)."""
    values = _array("load", load, 2, "[num_layers, num_experts]")
    num_layers, num_experts = values.shape
    fig = _new_figure(max(4.5, 0.55 * num_experts + 2.5), max(2.5, 0.4 * num_layers + 1.5))
    ax = fig.add_subplot()
    norm = _load_norm(values, num_experts)
    image = ax.imshow(np.ma.masked_invalid(values), cmap="RdBu_r", norm=norm, aspect="auto", interpolation="nearest")
    if values.size <= annotate_max_cells:
        for (layer, expert), value in np.ndenumerate(values):
            # Dark text on the pale centre of the colour map, white text on its saturated ends.
            strong = math.isfinite(value) and abs(norm(value) - 0.5) > 0.3
            ax.text(expert, layer, f"{100 * value:.1f}" if math.isfinite(value) else "nan", ha="center",
                    va="center", fontsize=7, color="white" if strong else "black")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    _integer_ticks(ax.xaxis)
    _integer_ticks(ax.yaxis)
    annotated = " (cells in %)" if values.size <= annotate_max_cells else ""
    ax.set_title(f"{title}{annotated}\nuniform load = 1/{num_experts} = {100.0 / num_experts:.3g}%")
    _load_colorbar(fig, image, ax, norm, num_experts)
    _save(fig, path)


def plot_balancer_biases(
    biases: np.ndarray, steps: Sequence[int], path: str | os.PathLike, title: str = "Balancer router biases"
) -> None:
    """Each expert's balancer bias over training, one panel per layer. biases [N, L, E], steps [N]."""
    bias = _array("biases", biases, 3, "[num_snapshots, num_layers, num_experts]")
    step = _steps(steps, bias.shape[0], "[num_snapshots]")
    _, num_layers, num_experts = bias.shape
    rows, cols = _grid(num_layers)
    fig = _new_figure(4.0 * cols + (1.6 if num_experts <= 20 else 0.5), 2.6 * rows + 1.0)
    axes = _panel_axes(fig, num_layers)
    colors = _colors(num_experts)
    marker = "." if step.size <= 50 else None
    for layer, ax in enumerate(axes):
        for expert in range(num_experts):
            ax.plot(step, bias[:, layer, expert], color=colors[expert], linewidth=1.2, marker=marker,
                    markersize=3, label=f"expert {expert}")
        ax.axhline(0.0, color="gray", linewidth=0.8, linestyle=":")
        ax.set_title(f"layer {layer}", fontsize=9)
        ax.grid(True, alpha=0.3)
    if num_experts <= 20:  # beyond that a legend is a wall of text; the colours still follow expert order
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside right center", fontsize=8)
    fig.supxlabel("training step")
    fig.supylabel("bias")
    fig.suptitle(title)
    _save(fig, path)


def _colors(count: int) -> list:
    from matplotlib import colormaps

    if count <= 10:
        return [colormaps["tab10"](i) for i in range(count)]
    if count <= 20:
        return [colormaps["tab20"](i) for i in range(count)]
    return [colormaps["viridis"](i / (count - 1)) for i in range(count)]


def plot_routing_entropy(
    entropy: np.ndarray, steps: Sequence[int], path: str | os.PathLike, title: str = "Routing entropy per layer"
) -> None:
    """Normalised routing entropy (1 = perfectly uniform expert load) over training, one line per layer.

    entropy [N, L], steps [N]. Up to 12 layers get a legend; more get a colour scale by layer index instead.
    """
    values = _array("entropy", entropy, 2, "[num_snapshots, num_layers]")
    step = _steps(steps, values.shape[0], "[num_snapshots]")
    num_layers = values.shape[1]
    fig = _new_figure(8.0, 4.5)
    ax = fig.add_subplot()
    marker = "." if step.size <= 50 else None
    if num_layers <= 12:
        colors = _colors(num_layers)
    else:
        from matplotlib import colormaps

        colors = [colormaps["viridis"](i / (num_layers - 1)) for i in range(num_layers)]
    for layer in range(num_layers):
        ax.plot(step, values[:, layer], color=colors[layer], linewidth=1.2, marker=marker, markersize=3,
                label=f"layer {layer}")
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1.0, label="uniform (1.0)")
    ax.set_ylim(0.0, 1.05)
    ax.set_xlabel("training step")
    ax.set_ylabel("normalised entropy H / ln E")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if num_layers <= 12:
        ax.legend(loc="lower right", fontsize=8, ncols=2 if num_layers > 6 else 1)
    else:
        from matplotlib import colormaps
        from matplotlib.cm import ScalarMappable
        from matplotlib.colors import Normalize

        scale = ScalarMappable(norm=Normalize(0, num_layers - 1), cmap=colormaps["viridis"])
        fig.colorbar(scale, ax=ax, label="layer")
    _save(fig, path)
