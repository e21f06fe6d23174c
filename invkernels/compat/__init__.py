"""Drop-in classes for the flow libraries people already use.

Each submodule carries one library's class names, constructor signatures, calling convention and
state-dict layout, with invkernels' fused ops inside where the library's math maps onto them:

- :mod:`invkernels.compat.freia`: FrEIA's ``InvertibleModule`` blocks and a ``SequenceINN`` with
  ``memory_free=True``;
- :mod:`invkernels.compat.nflows`: nflows' coupling transforms and ``SimpleRealNVP``;
- :mod:`invkernels.compat.zuko`: zuko's ``GeneralCouplingTransform``, ``NICE`` and ``RealNVP``;
- :mod:`invkernels.compat.normflows`: normflows' affine couplings, ``GlowBlock``, ``ActNorm``,
  ``Invertible1x1Conv`` and ``CoupledRationalQuadraticSpline``.

``import invkernels.compat.<library>`` works without the library installed; its classes are
built on first use (they subclass the library's base classes), and using one without the library
raises ImportError naming it. :data:`constructed` counts the compat objects built, by class.
See docs/compat.md.
"""

from invkernels.compat._lazy import constructed

__all__ = ["constructed"]
