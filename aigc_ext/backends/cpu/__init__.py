"""The ``cpu`` backend: :mod:`~aigc_ext.backends.cpu.backend` declares it,
:mod:`~aigc_ext.backends.cpu.ops` holds its operators (loading the compiled library) and
:mod:`~aigc_ext.backends.cpu.op_checks` the argument checks of their fake kernels. Importing
this package imports nothing."""
