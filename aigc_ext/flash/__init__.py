"""The FlashAttention operator contract on the Python side (``docs/flash-contract.md``).

* :mod:`aigc_ext.flash.reference`: the contract in plain PyTorch, the oracle of the fused
  backends (``flash_reference``, ``flash_reference_backward``, ``dropout_keep_mask``);
* :mod:`aigc_ext.flash.philox`: Philox4x32-10 and the dropout keep mask.

Importing this package loads no compiled extension.
"""

from __future__ import annotations

from aigc_ext.flash.philox import dropout_keep_mask
from aigc_ext.flash.reference import flash_reference, flash_reference_backward

__all__ = ["dropout_keep_mask", "flash_reference", "flash_reference_backward"]
