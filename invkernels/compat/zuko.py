"""zuko's coupling flows under zuko's names, on invkernels' fused ops: change one import.

::

    import invkernels.compat.zuko as zf        # was: import zuko.flows as zf
    from zuko.transforms import AdditiveTransform
    flow = zf.NICE(features=5, context=2, univariate=AdditiveTransform, shapes=[()])
    loss = -flow(c).log_prob(x).mean()

Every class subclasses the zuko class of the same name (``GeneralCouplingTransform``, ``NICE`` and
``RealNVP`` from ``zuko.flows``, ``CouplingTransform`` from ``zuko.transforms``; the flows are
built from this module's couplings), keeps zuko's constructor signature, masks, parameter names,
state-dict layout and conventions (features-last ``[*, D]`` inputs, batched, unbatched or
broadcast context, ``flow(c)`` / ``transform(c)`` returning torch distributions and transforms),
and computes what zuko computes. What runs fused and what runs in zuko's own code is listed in
:mod:`invkernels.compat._zuko`. zuko must be installed (``pip install --no-deps zuko``); this
module imports without it.
"""

from typing import TYPE_CHECKING

from invkernels.compat._lazy import resolver

if TYPE_CHECKING:
    from invkernels.compat._zuko import (
        NICE,
        CouplingTransform,
        GeneralCouplingTransform,
        RealNVP,
    )

__all__ = [
    "CouplingTransform",
    "GeneralCouplingTransform",
    "NICE",
    "RealNVP",
]

__getattr__, __dir__ = resolver(__name__, "zuko", "zuko", __all__)
