"""Triton kernels, one module per kernel; `kernels.triton_ops` wraps them behind the reference API."""
