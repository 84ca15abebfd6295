"""The ``reference`` backend: :func:`aigc_ext.reference.sdpa_reference`."""

from aigc_ext.reference import sdpa_reference as sdpa

__all__ = ["sdpa"]
