"""The ``triton`` attention backend: FlashAttention-2 kernels in Triton for CUDA tensors.

* :mod:`aigc_ext.backends.triton.backend`: the backend's ``BACKEND`` spec, its function and its
  availability / support answers (imports neither Triton nor the kernels; the default plugin
  registers it);
* :mod:`aigc_ext.backends.triton.ops`: the operators ``torch.ops.aigc_ext.triton_attention_forward`` /
  ``triton_attention_backward`` with autograd and ``torch.compile`` support;
* :mod:`aigc_ext.backends.triton.kernels`: the Triton kernels and their autotuning configs;
* :mod:`aigc_ext.backends.triton.flash_ops` / :mod:`~aigc_ext.backends.triton.flash_kernels`:
  the FlashAttention-contract operators ``torch.ops.aigc_ext.triton_flash_forward`` /
  ``triton_flash_backward`` and their kernels (``docs/flash-contract.md``);
* :mod:`aigc_ext.backends.triton.compile_check`: ahead-of-time compilation for sm80 / sm90
  without a GPU (``python -m aigc_ext.backends.triton.compile_check``).

Importing this package imports nothing heavy; see ``docs/triton.md``.
"""
