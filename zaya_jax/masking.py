"""The score a masked (query, key) pair gets, one value for the XLA reference attention and the Pallas kernels.

It sits below both (zaya_jax/attention.py dispatches to zaya_jax/kernels/, and the kernels must mask exactly as the
reference does), so neither imports the other for it.
"""

# Finite, so a fully masked row (a padding row; a real token always sees itself) cannot NaN.
MASKED_SCORE = -1e30
