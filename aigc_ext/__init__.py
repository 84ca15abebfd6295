"""aigc_ext: fused attention kernels for PyTorch, registered as ``torch.ops.aigc_ext`` operators.

Quick start::

    import aigc_ext
    out = aigc_ext.scaled_dot_product_attention(q, k, v, is_causal=True)

    aigc_ext.backends()                 # what is available here, and why not
    with aigc_ext.use_backend("cpu"):   # force one backend
        ...

    # torch's own flash SDPA kernels (every caller, TorchScript and torch.compile included)
    torch.nn.attention.activate_flash_attention_impl("aigc_ext")
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
from aigc_ext.integrations import torch_provider as _torch_provider
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

# torch's flash-attention provider registry: the implementation "aigc_ext" is registered, not
# activated (torch asks providers to leave that to the user), unless AIGC_EXT_ACTIVATE_PROVIDER=1.
_torch_provider.register()
_torch_provider.activate_from_env()

# attn_implementation="aigc_ext" for transformers, whichever is imported first: registered now if
# transformers' modeling code is loaded, else as soon as it is (transformers is not imported here).
_hf.register_when_imported()
