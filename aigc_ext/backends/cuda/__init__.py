"""The CUDA C++ backend: the kernels of ``csrc/cuda`` (sm80 FlashAttention-2, sm90a forward).

``python -m aigc_ext.backends.cuda.compile_check`` compiles them without a GPU and checks
registers, spills and tensor core instructions (docs/cuda-build.md). Importing this package
imports nothing.
"""
