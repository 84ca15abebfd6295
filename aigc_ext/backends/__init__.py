"""The built-in attention backends, one folder each, with the same small surface.

Each ``aigc_ext/backends/<name>/backend.py`` declares its backend as one
:class:`~aigc_ext.backends.spec.BackendSpec` named ``BACKEND`` (name, priority, devices, why it
is unavailable here, why it cannot serve a call, and the function that serves a validated
:class:`~aigc_ext.validation.AttentionCall`); an ``ops.py`` beside it holds its operators or
its math:

* ``cpu``: the fused C++ operators ``torch.ops.aigc_ext.attention_forward`` / ``_backward``
  (sources in ``csrc/``), their fake kernels and autograd;
* ``triton``: FlashAttention-2 Triton kernels for CUDA (CPU through the Triton interpreter);
* ``reference``: pure PyTorch, the test oracle and the fallback.

The default plugin :mod:`aigc_ext.default_plugins.backends` registers them, through the hook
a third-party backend uses. Importing this package imports nothing.
"""
