"""Triton backend: kernels, launchers and the ``torch.ops.invkernels.*_triton`` ops.

One module per op family (``invkernels.triton.coupling``, ...); importing a module registers its
ops. Nothing is imported here, so that Triton loads only when the ops layer asks for this backend.
"""
