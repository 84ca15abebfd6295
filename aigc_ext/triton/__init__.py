"""The ``triton`` attention backend: FlashAttention-2 kernels in Triton for CUDA tensors.

* :mod:`aigc_ext.triton.backend`: the backend function and its availability / support answers
  (imports neither Triton nor the kernels; the built-in plugin registers it);
* :mod:`aigc_ext.triton.ops`: the operators ``torch.ops.aigc_ext.triton_attention_forward`` /
  ``triton_attention_backward`` with autograd and ``torch.compile`` support;
* :mod:`aigc_ext.triton.kernels`: the Triton kernels and their autotuning configs;
* :mod:`aigc_ext.triton.compile_check`: ahead-of-time compilation for sm80 / sm90 without a GPU.

Importing this package imports nothing heavy; see ``docs/triton.md``.
"""
