"""Flow models: Glow for images and RealNVP for vectors, with ``log_prob``, ``sample`` and
``bits_per_dim``. Docs: docs/models.md."""

from invkernels.models.base import FlowModel, standard_normal_log_prob
from invkernels.models.glow import Glow, RealNVP

__all__ = ["FlowModel", "Glow", "RealNVP", "standard_normal_log_prob"]
