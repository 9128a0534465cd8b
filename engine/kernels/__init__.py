"""Triton kernels for the GPU hot path, each with a plain-torch reference.

The references are the CPU path and the oracle the kernels are tested against
(in Triton's interpreter mode on machines without a GPU).
"""
