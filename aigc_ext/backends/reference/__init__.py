"""The ``reference`` backend: :mod:`~aigc_ext.backends.reference.backend` declares it,
:mod:`~aigc_ext.backends.reference.ops` holds its pure-PyTorch math (the test oracle).
Importing this package imports nothing."""
