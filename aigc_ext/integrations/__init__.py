"""Integrations with other libraries.

Each submodule imports its library lazily, inside the functions that need it, so importing
``aigc_ext`` or ``aigc_ext.integrations`` never imports a third-party package.

* :mod:`aigc_ext.integrations.patch`: route ``torch.nn.functional.scaled_dot_product_attention``
  to aigc_ext.
* :mod:`aigc_ext.integrations.transformers`: ``attn_implementation="aigc_ext"`` for Hugging Face
  transformers models.
"""
