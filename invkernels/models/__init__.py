"""Flow models: Glow for images, RealNVP and NeuralSplineFlow for vectors, with ``log_prob``,
``sample`` and ``bits_per_dim``. Docs: docs/models.md."""

from invkernels.models.base import FlowModel, standard_normal_log_prob
from invkernels.models.glow import Glow, RealNVP
from invkernels.models.spline import NeuralSplineFlow

__all__ = ["FlowModel", "Glow", "NeuralSplineFlow", "RealNVP", "standard_normal_log_prob"]
