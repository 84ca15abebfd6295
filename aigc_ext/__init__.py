"""aigc_ext: fused attention kernels for PyTorch, registered as ``torch.ops.aigc_ext`` operators.

Quick start::

    import aigc_ext
    out = aigc_ext.scaled_dot_product_attention(q, k, v, is_causal=True)

    aigc_ext.backends()                 # what is available here, and why not
    with aigc_ext.use_backend("cpu"):   # force one backend
        ...
"""

from __future__ import annotations

from aigc_ext import (
    nn,
    ops,  # loads the compiled operators
)
from aigc_ext.api import scaled_dot_product_attention
from aigc_ext.dispatch import (
    BackendError,
    BackendInfo,
    backends,
    register_backend,
    use_backend,
)
from aigc_ext.hookspecs import hookimpl
from aigc_ext.integrations import transformers as _hf
from aigc_ext.integrations.patch import patch_sdpa

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "BackendInfo",
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

# attn_implementation="aigc_ext" for transformers, whichever is imported first: registered now if
# transformers' modeling code is loaded, else as soon as it is (transformers is not imported here).
_hf.register_when_imported()
