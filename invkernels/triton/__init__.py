"""Triton backend: kernels and launchers, one module per op family (``invkernels.triton.coupling``, ...).

Each module maps the names of its family's registered ops to their launchers in ``LAUNCHERS``;
invkernels.ops defines the ops ``torch.ops.invkernels.<op>_triton`` from the C++ schemas with them
(invkernels.ops._registry), so the Triton backend needs the compiled extension. Nothing is imported
here, so that Triton loads only when the ops layer asks for this backend.
"""
