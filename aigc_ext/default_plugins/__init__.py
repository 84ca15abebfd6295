"""aigc_ext's built-in plugins, loaded by module name (:data:`aigc_ext.plugins.DEFAULT_PLUGINS`)
before any installed plugin, through the same hooks a third-party plugin implements:

* :mod:`~aigc_ext.default_plugins.backends`: the ``cpu``, ``triton`` and ``reference``
  attention backends, from the table :data:`~aigc_ext.default_plugins.backends.BUILTIN_BACKENDS`;
* :mod:`~aigc_ext.default_plugins.training`: the models, datasets and recipes of
  ``aigc-ext train``.

Importing this package imports nothing.
"""
