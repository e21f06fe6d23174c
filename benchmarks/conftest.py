"""pytest-benchmark set-up of ``pytest benchmarks/``: the device, rounds and threads options, the
allocator settings shared by every provider, and the run's description in the JSON's
``machine_info["invkernels"]`` (read back by ``benchmarks/run.py``)."""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from dataclasses import dataclass

import pytest
import torch

import harness

_META = pytest.StashKey[dict]()
_SETTINGS = pytest.StashKey["Settings"]()


@dataclass(frozen=True)
class Settings:
    """What every benchmark of the run uses: the device, the interleaved rounds per case and the
    invkernels backends timed there."""

    device: str
    rounds: int
    threads: int
    backends: tuple[str, ...]


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"should be an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"should be >= 1, got {value}")
    return value


def pytest_addoption(parser):
    group = parser.getgroup("invkernels benchmarks")
    group.addoption("--bench-device", choices=harness.DEVICES, default="cpu",
                    help="device of the benchmark tensors (default cpu)")
    group.addoption("--bench-rounds", type=_positive, default=8, help="interleaved rounds per case (default 8)")
    group.addoption("--bench-threads", type=_positive, default=2, help="torch CPU threads (default 2)")


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """Restart pytest with the allocator settings when they are not in effect: glibc reads them at
    start-up only, and every provider is timed with them (harness.ALLOCATOR_ENV)."""
    if not harness.allocator_env_in_effect():
        print("benchmarks: restarting with " + " ".join(f"{k}={v}" for k, v in harness.ALLOCATOR_ENV.items()),
              file=sys.stderr)
        harness.ensure_allocator_env()


def _device_description(device: str) -> tuple[str, float | None]:
    """The device in words, and its peak DRAM bandwidth (GB/s) on a GPU."""
    if device == "cpu":
        return "CPU", None
    import triton.testing  # noqa: PLC0415

    props = torch.cuda.get_device_properties(0)
    peak = triton.testing.get_dram_gbps(0)
    return (f"{props.name} (sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB, "
            f"{props.multi_processor_count} SMs)"), peak


def pytest_configure(config):
    device = config.getoption("--bench-device")
    if device == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError("benchmarks: --bench-device cuda: no CUDA device is visible "
                                "(torch.cuda.is_available() is False)")
    threads = config.getoption("--bench-threads")
    torch.set_num_threads(threads)
    import invkernels  # noqa: PLC0415

    backends, skipped = harness.invkernels_backends(device)
    if not backends:
        raise pytest.UsageError(f"benchmarks: no invkernels backend can be timed on {device}: {skipped}")
    info = invkernels.build_info()
    description, peak = _device_description(device)
    config.stash[_SETTINGS] = Settings(device, config.getoption("--bench-rounds"), threads, tuple(backends))
    config.stash[_META] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{harness.cpu_name()}, {os.cpu_count()} cores, torch threads {threads}, "
                   f"capability {torch.backends.cpu.get_cpu_capability()}",
        "device": device,
        "device_description": description,
        "peak_bandwidth_gbs": peak,
        "cuda_visible": torch.cuda.is_available(),
        "visible_gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "triton": info["triton_version"],
        "cpu_library": info["cpu_library"],
        "cuda_build": bool(info.get("cuda")),
        "backends": backends,
        "not_timed": skipped,
        "rounds": config.getoption("--bench-rounds"),
        "threads": threads,
        "allocator_env": harness.allocator_env_in_effect(),
        "failed": {},
    }


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Keeps each failed benchmark's error for the report (``machine_info["invkernels"]["failed"]``):
    a provider that raises fails its test, the others' timings stay in the JSON."""
    report = yield
    if report.failed and call.excinfo is not None and _META in item.config.stash:
        message = call.excinfo.exconly().strip().splitlines()
        item.config.stash[_META]["failed"][item.nodeid] = message[0][:400] if message else call.excinfo.typename
    return report


def pytest_benchmark_update_machine_info(config, machine_info):
    if _META in config.stash:
        machine_info["invkernels"] = config.stash[_META]


@pytest.fixture(scope="session")
def settings(pytestconfig) -> Settings:
    """The run's device, rounds, threads and timed invkernels backends."""
    return pytestconfig.stash[_SETTINGS]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
