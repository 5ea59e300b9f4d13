"""Numba kernels and native bindings (BLAS, oneDNN) the compiled engine calls, loaded when first needed."""
