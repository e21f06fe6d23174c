"""nflows' coupling transforms under nflows' names, on invkernels' fused ops: change one import.

::

    import invkernels.compat.nflows as nf      # was: from nflows.transforms import coupling as nf
    layer = nf.PiecewiseRationalQuadraticCouplingTransform(mask, net, num_bins=8, tails="linear",
                                                           tail_bound=3.0)
    z, logabsdet = layer(x, context=c)

Every class subclasses the nflows class of the same name (``SimpleRealNVP`` subclasses
``nflows.flows.realnvp.SimpleRealNVP`` and is built from this module's couplings), keeps nflows'
constructor signature, direction convention (``transform(x) -> (z, logabsdet)``, ``inverse``),
masks and state-dict layout, and computes what nflows computes. What runs fused and what runs in
nflows' own tensor ops is listed in :mod:`invkernels.compat._nflows`. nflows must be installed
(``pip install --no-deps nflows``); this module imports without it.
"""

from typing import TYPE_CHECKING

from invkernels.compat._lazy import resolver

if TYPE_CHECKING:
    from invkernels.compat._nflows import (
        AdditiveCouplingTransform,
        AffineCouplingTransform,
        PiecewiseRationalQuadraticCouplingTransform,
        SimpleRealNVP,
    )

__all__ = [
    "AdditiveCouplingTransform",
    "AffineCouplingTransform",
    "PiecewiseRationalQuadraticCouplingTransform",
    "SimpleRealNVP",
]

__getattr__, __dir__ = resolver(__name__, "nflows", "nflows", __all__)
