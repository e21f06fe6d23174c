"""Copy bandwidth of the device: the yardstick of every GB/s in the report (a torch copy of
256 MiB, bytes read + written over the median time)."""

from __future__ import annotations

import pytest
import torch

import harness

COPY_MIB = 256
COPY_REPS = 20


@pytest.mark.benchmark(group="bandwidth")
def test_copy_bandwidth(benchmark, settings):
    src = torch.randn(COPY_MIB * 2**20 // 4, device=settings.device)
    dst = torch.empty_like(src)
    harness.interleaved(benchmark, {"copy": lambda: dst.copy_(src)}, rounds=1, reps=COPY_REPS,
                        device=settings.device, section="bandwidth", bytes=2 * src.numel() * src.element_size())


def copy_bandwidth_gbs(res: harness.Results) -> float:
    """The measured copy bandwidth of a run (GB/s)."""
    entry = res.get("bandwidth")
    return entry["bytes"] / (res.timings(entry)["copy"].median * 1e-3) / 1e9
