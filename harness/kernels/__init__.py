"""The native kernels behind `harness.ops`, built or compiled at first use: the C kernel for the CPU
(`native`, source in csrc/deform_columns.c), the GPU layer's C++ autograd ops (`cpp_autograd`, source in
csrc/deform_layer.cpp) and the opt-in Triton kernels for CUDA (`triton_kernels`). Each says with
`status()` whether it is in use here, and why not; `harness.ops` falls back to PyTorch without them.
"""
