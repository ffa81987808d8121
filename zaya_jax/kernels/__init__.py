"""Pallas kernels for CCA (see docs/kernels.md): flash attention forward and backward, decode attention."""
