"""FrEIA's blocks under FrEIA's names, on invkernels' fused ops: change one import.

::

    import invkernels.compat.freia as Fm       # was: import FrEIA.modules as Fm
    inn = Fm.SequenceINN(4, 8, 8, memory_free=True)
    for _ in range(8):
        inn.append(Fm.AllInOneBlock, subnet_constructor=subnet, affine_clamping=2.0)

Every class subclasses ``FrEIA.modules.InvertibleModule`` (``SequenceINN`` subclasses
``FrEIA.framework.SequenceINN``), keeps FrEIA's constructor signature, calling convention
(``block([x], c=[...], rev=False, jac=True) -> ((y,), logdet)``), parameter names and split
rounding, and computes what FrEIA's main branch computes (commit 4212496). What runs fused and
what runs in tensor ops is listed in docs/compat/freia.md. FrEIA must be installed
(``pip install --no-deps FrEIA``); this module imports without it.
"""

from typing import TYPE_CHECKING

from invkernels.compat._lazy import resolver

if TYPE_CHECKING:
    from invkernels.compat._freia import (
        ActNorm,
        AffineCouplingOneSided,
        AllInOneBlock,
        GLOWCouplingBlock,
        NICECouplingBlock,
        PermuteRandom,
        RNVPCouplingBlock,
        SequenceINN,
    )

__all__ = [
    "ActNorm",
    "AffineCouplingOneSided",
    "AllInOneBlock",
    "GLOWCouplingBlock",
    "NICECouplingBlock",
    "PermuteRandom",
    "RNVPCouplingBlock",
    "SequenceINN",
]

__getattr__, __dir__ = resolver(__name__, "FrEIA", "FrEIA", __all__)
