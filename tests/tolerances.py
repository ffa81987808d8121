"""Comparison bounds for float32 results that follow from the computation, not from the machine that ran it.

A float32 sum of n terms, in any order, is within gamma_n * sum|x_i| of the exact sum, gamma_n = n u / (1 - n u),
u = eps / 2 (Higham, "Accuracy and Stability of Numerical Algorithms", 2nd ed., section 4.2; a fused multiply-add
only removes roundings). Two implementations that order the same sums differently (sorted vs dense experts, a
kernel vs XLA, one processor's vector width or FMA use vs another's) each carry that error, so they differ by at
most about n * eps * sum|x_i|. A result built from `depth` such reductions in a chain (a layer's matmuls, a
backward pass) accumulates, to first order, `depth` of them. The scale sum|x_i| is taken as max |reference| of
the tensor compared: the terms' magnitude, absent heavy cancellation, which the tests' random inputs do not have.

    bound = depth * terms * eps32 * max|reference|                (absolute, on every element)

A real bug (a wrong sign, a missing term, a wrong expert) moves results by a fraction of their scale, orders of
magnitude above these bounds for the terms and depths the tests use (a few hundred at most: < 1e-3).
"""

from __future__ import annotations

import numpy as np

EPS32 = float(np.finfo(np.float32).eps)  # 2^-23, the spacing of float32 at 1


def float32_bound(terms: int, depth: int = 1) -> float:
    """Relative (to max |reference|) bound for float32 results built from `depth` chained sums of `terms` terms."""
    return depth * terms * EPS32


def scaled_error(got, want) -> float:
    """max |got - want| / max |want| (float64; want must not be all zeros: then nothing would be tested)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    assert np.isfinite(got).all(), "non-finite values in the result"
    scale = float(np.abs(want).max())
    assert scale > 0, "the reference is all zeros: the comparison would test nothing"
    return float(np.abs(got - want).max()) / scale


def assert_float32_close(got, want, *, terms: int, depth: int = 1, name: str = "") -> float:
    """Assert scaled_error(got, want) <= float32_bound(terms, depth); returns the scaled error."""
    err, bound = scaled_error(got, want), float32_bound(terms, depth)
    assert err <= bound, (f"{name}: max |error| / max |reference| = {err:.3g} > {bound:.3g} "
                          f"(= {depth} chained sums x {terms} terms x float32 eps)")
    return err


# Chained reductions in one ZAYA1 decoder layer's forward: input RMSNorm, the q/k/v projections, the depthwise and
# the grouped convolution, QK-norm, the scores, the softmax's sum, probabilities x values, o_proj, the residual
# merge, the post-attention RMSNorm, the router's down-projection, its RMSNorm, fc1, fc2, out_proj and softmax,
# the experts' gate_up and down, and the residual merge after the MoE.
REDUCTIONS_PER_LAYER = 21
# Around the layers: the embedding's affine, the final RMSNorm and the LM head.
REDUCTIONS_OUTSIDE_LAYERS = 3


def model_depth(num_layers: int, *, backward: bool = False) -> int:
    """Chained reductions behind the model's logits (`backward`: behind a parameter gradient, which runs them again
    in reverse)."""
    forward = REDUCTIONS_PER_LAYER * num_layers + REDUCTIONS_OUTSIDE_LAYERS
    return 2 * forward if backward else forward


def model_terms(config, seq_len: int) -> int:
    """The longest sum in the model's forward: over the hidden width, a projection's inputs, an expert's hidden
    units, or the keys of a sequence."""
    return max(config.hidden_size, config.query_heads * config.head_dim, config.expert_hidden_size,
               config.router_hidden_size, seq_len)


BF16_EPS = 2.0**-7  # the spacing of bfloat16 at 1 (8 significant bits)

# One top-1 SwiGLU expert on a token: gate_up, SwiGLU, down (3 chained steps); its gradients add the two transposed
# matmuls (5). The sums run over the hidden width or the expert's units, and in the weights' gradients over tokens.
EXPERT_DEPTH, EXPERT_GRAD_DEPTH = 3, 5
# Chained roundings of one AdamW step on one element: two moment updates (2 each), two bias corrections, the square
# root, eps, the division, weight decay, the learning rate.
ADAM_DEPTH = 10


def cross_entropy_bound(*, max_abs_logit: float, logits_bound: float, loss: float, vocab: int, tokens: int) -> float:
    """Absolute bound on a float32 mean token cross-entropy whose logits carry at most logits_bound * max_abs_logit
    error: log-sum-exp and the target logit move by at most the logits' max error each (both are 1-Lipschitz in the
    max norm), and the log-sum-exp over the vocabulary and the mean over the tokens add their own sums' rounding.
    (Relative to the loss itself the logits' bound would be far looser than needed: at init the logits are ~0.1 and
    the loss is log(vocab).)"""
    return 2 * logits_bound * max_abs_logit + float32_bound(max(vocab, tokens), 2) * abs(loss)
