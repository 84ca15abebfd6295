"""The ``cuda`` attention backend: the CUDA C++ kernels of ``csrc/cuda/`` for CUDA tensors.

* :mod:`aigc_ext.backends.cuda.backend`: the backend's ``BACKEND`` spec, its function and its
  availability / support answers (the default plugin registers it).

The kernels are the CUDA dispatch-key implementations of the same ``torch.ops.aigc_ext``
operators the ``cpu`` backend calls (``attention_forward`` / ``attention_backward``,
``flash_forward`` / ``flash_backward``), present only in builds with ``AIGC_EXT_WITH_CUDA=1``.
Importing this package imports nothing heavy; see ``docs/cuda.md``.
"""
