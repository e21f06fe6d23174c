"""`make gpu-check`: the stages of the GPU check, timed, on a machine with an NVIDIA GPU.

Finds the visible GPUs with nvidia-smi before anything else and exits with 1 and a "no CUDA
device" message when there are none. Otherwise runs each stage's shell command with
MAX_JOBS = the number of cores, INVKERNELS_WITH_CUDA=1 and INVKERNELS_CUDA_ARCHS = the visible
GPUs' archs (so the build compiles CUDA for them only), prints each stage's time, and ends with a
summary. A --setup stage that fails stops the check; a failing --stage is reported and the next
stages still run. Uses only the standard library: it runs before the environment exists.

    python3 scripts/gpu_check.py --setup build "make build" --stage tests "pytest -m cuda"
    python scripts/gpu_check.py --report-device   # with torch: the build and the GPU torch sees
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

NO_DEVICE = 1


def parse_gpus(text: str) -> list[tuple[str, str]]:
    """(name, compute capability) of each GPU in the output of
    ``nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader``."""
    gpus = []
    for line in text.splitlines():
        if not line.strip():
            continue
        name, _, capability = line.rpartition(",")
        if not name or not capability.strip().replace(".", "").isdigit():
            raise ValueError(f"parse_gpus: expected 'name, major.minor' per line, got {line!r}")
        gpus.append((name.strip(), capability.strip()))
    return gpus


def find_gpus(env: dict[str, str]) -> tuple[list[tuple[str, str]], str]:
    """The visible GPUs, and why there are none when the list is empty."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return [], f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU"
    smi = shutil.which("nvidia-smi", path=env.get("PATH"))
    if smi is None:
        return [], "nvidia-smi is not on PATH (no NVIDIA driver)"
    try:
        out = subprocess.run([smi, "--query-gpu=name,compute_cap", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return [], f"nvidia-smi failed: {exc}"
    if out.returncode != 0:
        return [], f"nvidia-smi failed: {(out.stderr or out.stdout).strip()}"
    gpus = parse_gpus(out.stdout)
    return gpus, "" if gpus else "nvidia-smi lists no GPU"


def stage_env(env: dict[str, str], gpus: list[tuple[str, str]]) -> dict[str, str]:
    """The environment of the stages: build for the visible GPUs' archs, on every core."""
    env = dict(env)
    env.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    env["INVKERNELS_WITH_CUDA"] = "1"
    env.setdefault("INVKERNELS_CUDA_ARCHS", ";".join(sorted({capability for _, capability in gpus})))
    return env


def run_stages(stages: list[tuple[str, str, bool]], env: dict[str, str]) -> list[tuple[str, float, int | None]]:
    """Runs (name, command, required) in order; a failing required stage skips the rest
    (their return code is None)."""
    results: list[tuple[str, float, int | None]] = []
    stopped = False
    for name, command, required in stages:
        if stopped:
            results.append((name, 0.0, None))
            continue
        print(f"[gpu-check] {name}: {command}", flush=True)
        start = time.perf_counter()
        rc = subprocess.run(command, shell=True, env=env).returncode
        seconds = time.perf_counter() - start
        print(f"[gpu-check] {name}: {seconds:.1f} s, {'ok' if rc == 0 else f'failed (exit {rc})'}", flush=True)
        results.append((name, seconds, rc))
        stopped = required and rc != 0
    return results


def report_device() -> int:
    """Prints what was built and the GPU torch sees; 1 unless the CUDA backend is built and a GPU
    is visible to torch."""
    import torch  # noqa: PLC0415 - the stages' environment has torch, this script's may not

    import invkernels  # noqa: PLC0415

    info = invkernels.build_info()
    print(f"[gpu-check] build_info: {info}")
    if not (info["cuda"] and info["cuda_available"]):
        print(f"gpu-check: the CUDA backend is not usable here: build_info()['cuda'] is {info['cuda']}, "
              f"torch.cuda.is_available() is {info['cuda_available']}", file=sys.stderr)
        return 1
    props = torch.cuda.get_device_properties(0)
    print(f"[gpu-check] torch {torch.__version__} sees {props.name} (sm {props.major}.{props.minor}, "
          f"{props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB)")
    return 0


class _StageAction(argparse.Action):
    """Collects --setup and --stage in command-line order as (name, command, required)."""

    def __call__(self, parser, namespace, values, option_string=None):
        name, command = values
        namespace.stages = [*namespace.stages, (name, command, option_string == "--setup")]


def main(argv: list[str] | None = None, env: dict[str, str] | None = None) -> int:
    """Runs the check; returns its exit code (NO_DEVICE without a visible GPU)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.set_defaults(stages=[])
    parser.add_argument("--setup", nargs=2, action=_StageAction, metavar=("NAME", "COMMAND"),
                        help="a stage the later ones need: its failure stops the check")
    parser.add_argument("--stage", nargs=2, action=_StageAction, metavar=("NAME", "COMMAND"),
                        help="a stage whose failure is reported while the next stages still run")
    parser.add_argument("--report-device", action="store_true",
                        help="only print the build and the GPU torch sees (exit 1 unless CUDA is usable)")
    args = parser.parse_args(argv)
    if args.report_device:
        return report_device()
    env = dict(os.environ if env is None else env)
    gpus, reason = find_gpus(env)
    if not gpus:
        print(f"gpu-check: no CUDA device ({reason}); run it on a machine with an NVIDIA GPU", file=sys.stderr)
        return NO_DEVICE
    env = stage_env(env, gpus)
    print(f"[gpu-check] GPUs: {', '.join(f'{n} (sm {c})' for n, c in gpus)}; MAX_JOBS={env['MAX_JOBS']}, "
          f"INVKERNELS_CUDA_ARCHS={env['INVKERNELS_CUDA_ARCHS']}", flush=True)
    results = run_stages(args.stages, env)
    total = sum(seconds for _, seconds, _ in results)
    print("[gpu-check] summary:")
    for name, seconds, rc in results:
        status = "not run" if rc is None else ("ok" if rc == 0 else f"failed (exit {rc})")
        print(f"[gpu-check]   {name:<8} {seconds:7.1f} s  {status}")
    print(f"[gpu-check]   total    {total:7.1f} s")
    return 0 if all(rc == 0 for _, _, rc in results) else 1


if __name__ == "__main__":
    sys.exit(main())
