"""aigc_ext: fused attention kernels for PyTorch, registered as ``torch.ops.aigc_ext`` operators.

Quick start::

    import aigc_ext
    out = aigc_ext.scaled_dot_product_attention(q, k, v, is_causal=True)

    aigc_ext.backends()                 # what is available here, and why not
    with aigc_ext.use_backend("cpu"):   # force one backend
        ...
"""

from __future__ import annotations

from aigc_ext import nn
from aigc_ext._version import __version__
from aigc_ext.api import scaled_dot_product_attention
from aigc_ext.backends.cpu import ops  # loads the compiled operators
from aigc_ext.backends.spec import BackendSpec
from aigc_ext.dispatch import (
    BackendError,
    BackendInfo,
    backends,
    register_backend,
    use_backend,
)
from aigc_ext.hookspecs import hookimpl
from aigc_ext.integrations.patch import patch_sdpa

__all__ = [
    "BackendError",
    "BackendInfo",
    "BackendSpec",
    "__version__",
    "backends",
    "hookimpl",
    "nn",
    "ops",
    "patch_sdpa",
    "register_backend",
    "scaled_dot_product_attention",
    "use_backend",
]

# Make attn_implementation="aigc_ext" available when transformers models are already loaded
# (registering then costs about 10 ms); otherwise call aigc_ext.integrations.transformers.register().
import sys as _sys

if "transformers.modeling_utils" in _sys.modules:
    try:
        from aigc_ext.integrations import transformers as _hf

        _hf.register()
    except Exception as _exc:  # a broken transformers must not break `import aigc_ext`
        import warnings as _warnings

        _warnings.warn(f"aigc_ext: could not register with transformers: {_exc}", stacklevel=2)
