"""normflows' coupling, Glow and spline flows under normflows' names, on invkernels' fused ops:
change one import.

::

    import invkernels.compat.normflows as nf   # was: import normflows.flows as nf
    flows = [nf.GlowBlock(4, 32, split_mode="channel", scale=True, use_lu=True) for _ in range(8)]
    model = normflows.NormalizingFlow(base, flows)

Every class subclasses the normflows class of the same name (``normflows.flows.*``), keeps
normflows' constructor signature, direction convention (``forward``: z -> x with
``(x, log_det)``, ``inverse``: x -> z), parameters, buffers and state-dict layout, and computes
what normflows computes; ``GlowBlock`` and ``CoupledRationalQuadraticSpline`` make normflows' draws
in normflows' order. What runs fused and what runs in normflows' own code is listed in
:mod:`invkernels.compat._normflows` and docs/compat/normflows.md. normflows must be installed
(``pip install --no-deps normflows``); this module imports without it.
"""

from typing import TYPE_CHECKING

from invkernels.compat._lazy import resolver

if TYPE_CHECKING:
    from invkernels.compat._normflows import (
        ActNorm,
        AffineConstFlow,
        AffineCouplingBlock,
        CoupledRationalQuadraticSpline,
        GlowBlock,
        Invertible1x1Conv,
        MaskedAffineFlow,
    )

__all__ = [
    "ActNorm",
    "AffineConstFlow",
    "AffineCouplingBlock",
    "CoupledRationalQuadraticSpline",
    "GlowBlock",
    "Invertible1x1Conv",
    "MaskedAffineFlow",
]

__getattr__, __dir__ = resolver(__name__, "normflows", "normflows", __all__)
