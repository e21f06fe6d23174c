"""Invertible modules: ``forward(x) -> (y, logdet)`` and ``inverse(y) -> x``."""

from invkernels.nn.actnorm import ActNorm
from invkernels.nn.coupling import AdditiveCoupling, AffineCoupling
from invkernels.nn.glow import GlowStep
from invkernels.nn.invconv import InvConv1x1
from invkernels.nn.multiscale import Split, Squeeze
from invkernels.nn.permute import Permute
from invkernels.nn.protocol import BlockOnHalves, FusedInverseBackward, InvertibleBlock
from invkernels.nn.residual import InvertibleResidual
from invkernels.nn.reversible import ReversibleBlock
from invkernels.nn.sequential import InvertibleSequential
from invkernels.nn.spline import RQSplineCoupling
from invkernels.nn.subnets import conv_subnet, mlp_subnet

__all__ = [
    "ActNorm",
    "AdditiveCoupling",
    "AffineCoupling",
    "BlockOnHalves",
    "FusedInverseBackward",
    "GlowStep",
    "InvConv1x1",
    "InvertibleBlock",
    "InvertibleResidual",
    "InvertibleSequential",
    "Permute",
    "RQSplineCoupling",
    "ReversibleBlock",
    "Split",
    "Squeeze",
    "conv_subnet",
    "mlp_subnet",
]
