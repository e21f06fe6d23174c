"""Incremental build of the extension, what `make build` and `make demo` run.

The build runs only when one of its inputs changed since the last build that succeeded: a file
under csrc/, setup.py, build_config.json or pyproject.toml (modification time and size, as make
and ninja see them), the build options in the environment, or the torch installed. Then
``setup.py build_ext --inplace`` compiles through ninja in build/ext/, where only the objects whose
sources or headers changed are compiled again; the first build registers the package with
``pip install -e . --no-build-isolation``. The state of the last build is build/state.json.

Targets:
  full  what `make test` needs: the CPU kernels for every capability and, where nvcc and a CUDA
        build of torch are present, the CUDA backend (setup.py's defaults).
  demo  what runs on this machine: the CPU kernels for this CPU's capability, and the CUDA
        backend only when a GPU is visible. A full build of the same inputs satisfies it.

Then (unless --no-report) the build report is printed from what was built:
scripts/build_report.py.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_DIR = os.path.join(ROOT, "build")
STATE = os.path.join(BUILD_DIR, "state.json")
INPUT_FILES = ("setup.py", "build_config.json", "pyproject.toml")
INPUT_DIRS = ("csrc",)
# The environment that setup.py reads.
OPTIONS = ("INVKERNELS_WITH_CUDA", "INVKERNELS_CUDA_ARCHS", "TORCH_CUDA_ARCH_LIST", "INVKERNELS_CPU_CAPABILITIES",
           "DEBUG", "CUDA_HOME", "CXX", "CC")


def inputs() -> dict[str, list[int]]:
    """Every input file (relative path) -> ``[mtime_ns, size]``."""
    paths = [os.path.join(ROOT, p) for p in INPUT_FILES]
    for d in INPUT_DIRS:
        for base, dirs, files in os.walk(os.path.join(ROOT, d)):
            dirs.sort()
            paths += [os.path.join(base, f) for f in sorted(files)]
    out = {}
    for path in paths:
        st = os.stat(path)
        out[os.path.relpath(path, ROOT)] = [st.st_mtime_ns, st.st_size]
    return out


def target_env(target: str) -> dict[str, str]:
    """The build options of ``target`` (the caller's own settings win)."""
    env = {k: os.environ[k] for k in OPTIONS if k in os.environ}
    if target == "demo":
        env.setdefault("INVKERNELS_CPU_CAPABILITIES", "native")
        if "INVKERNELS_WITH_CUDA" not in env and not _gpu_visible():
            env["INVKERNELS_WITH_CUDA"] = "0"
    return env


def _gpu_visible() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) == "":
        return False
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def wanted(target: str) -> dict:
    return {"inputs": inputs(), "env": target_env(target), "torch": importlib.metadata.version("torch"),
            "python": sys.executable}


def _registered() -> bool:
    try:
        dist = importlib.metadata.distribution("invkernels")
    except importlib.metadata.PackageNotFoundError:
        return False
    return any("__editable__" in str(f) for f in dist.files or ())


def _libraries_present() -> bool:
    names = os.listdir(os.path.join(ROOT, "invkernels"))
    return any(n.startswith("_C.") and n.endswith(".so") for n in names) and any(
        n.startswith("_cpu_") and n.endswith(".so") for n in names)


def up_to_date(target: str, want: dict) -> bool:
    """Whether the last build covers ``target`` with the inputs of ``want``."""
    try:
        with open(STATE, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError):
        return False
    if not _libraries_present() or not _registered():
        return False
    same_sources = all(state.get(k) == want[k] for k in ("inputs", "torch", "python"))
    if not same_sources:
        return False
    if state.get("env") == want["env"]:
        return True
    # A full build with the default options serves the demo.
    return target == "demo" and state.get("target") == "full" and state.get("env") == target_env("full")


def run_build(target: str, options: dict[str, str], log_path: str) -> int:
    """Build ``target`` with the build ``options`` (:func:`target_env`) in the environment."""
    env = dict(os.environ, **options)
    if _registered():
        command = [sys.executable, "setup.py", "build_ext", "--inplace"]
    else:
        command = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-v", "-e", "."]
    settings = " ".join(f"{k}={v}" for k, v in sorted(options.items()))
    print(f"building invkernels ({target}{': ' + settings if settings else ''}; log: "
          f"{os.path.relpath(log_path, ROOT)})", flush=True)
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        proc = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        with open(log_path, encoding="utf-8", errors="replace") as log:
            print("".join(log.readlines()[-60:]), end="")
        return proc.returncode
    print(f"built in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=("full", "demo"), default="full")
    parser.add_argument("--log", default=os.path.join(BUILD_DIR, "build.log"), help="the compiler output")
    parser.add_argument("--no-report", action="store_true", help="skip the build report")
    args = parser.parse_args(argv)
    os.makedirs(BUILD_DIR, exist_ok=True)
    want = wanted(args.target)
    if up_to_date(args.target, want):
        print(f"invkernels is up to date ({args.target} build; state: {os.path.relpath(STATE, ROOT)})")
    else:
        if os.path.exists(STATE):
            os.remove(STATE)
        rc = run_build(args.target, want["env"], args.log)
        if rc != 0:
            return rc
        # The inputs as they were when the build started: a file edited during the build rebuilds next time.
        with open(STATE, "w", encoding="utf-8") as f:
            json.dump(dict(want, target=args.target), f, indent=1)
    if args.no_report:
        return 0
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "build_report.py")], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main())
