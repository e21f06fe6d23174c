"""Ahead-of-time compilation of every Triton kernel in every GPU configuration, for real GPU
targets, on any machine (no GPU needed): ``python -m invkernels.triton.aot``.

The launchers pick their tiles on a GPU from small explicit sets (each Triton module's
``gpu_configs()``, the function its launchers use). This module runs every launcher on ``meta``
tensors with the kernels replaced by recorders, so what it compiles is exactly the launches the
launchers make (argument types, constexprs, warps), for every configuration of the set; it checks
that the recorded launches cover the set. Each launch is compiled by ``triton.compile`` for sm_80
and sm_90 (Triton's bundled ptxas, no driver), and ``ptxas -v`` on its PTX reports registers and
spills. This catches what the interpreter cannot: compiler type errors, unsupported operations,
shared-memory overflow, spills.

It must run without ``TRITON_INTERPRET=1``: under the interpreter ``@triton.jit`` gives functions
that ``triton.compile`` cannot compile, and the launchers pick the interpreter's tiles.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import hashlib
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from typing import NamedTuple

import torch

# GPU targets: (compute capability, ptxas architecture).
TARGETS = {80: "sm_80", 90: "sm_90a"}
# Input dtypes compiled; half inputs share the float32 math, bfloat16 stands for both.
DTYPES = (torch.float32, torch.float64, torch.bfloat16)

_TYPE_NAMES = {torch.float32: "fp32", torch.float64: "fp64", torch.float16: "fp16", torch.bfloat16: "bf16",
               torch.int64: "i64", torch.int32: "i32", torch.bool: "i1"}


class Launch(NamedTuple):
    """One kernel launch as a launcher makes it: the kernel's module and name, the signature
    (parameter -> Triton type, ``"constexpr"`` for constexprs), the constexpr values and the warps."""

    module: str
    kernel: str
    signature: dict
    constexprs: dict
    num_warps: int

    def key(self) -> str:
        consts = ",".join(f"{k}={_text(v)}" for k, v in self.constexprs.items())
        types = ",".join(self.signature[k] for k in self.signature if self.signature[k] != "constexpr")
        return f"{self.kernel}[{consts},warps={self.num_warps}]({types})"


def _text(value) -> str:
    return str(value).replace("triton.language.", "")


def _type_of(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + _TYPE_NAMES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"aot: no Triton type for a launch argument of type {type(value).__name__}")


class _Recorder:
    """Stands in for a ``@triton.jit`` kernel: ``kernel[grid](**kwargs)`` records the launch."""

    def __init__(self, module: str, name: str, fn, launches: list[Launch]):
        self._module, self._name, self._fn, self._launches = module, name, fn, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if args:
                raise TypeError(f"aot: {self._name} is launched with positional arguments; the launchers pass keywords")
            num_warps = kwargs.pop("num_warps", 4)
            signature, constexprs = {}, {}
            for param in self._fn.params:
                value = kwargs[param.name]
                if param.is_constexpr:
                    signature[param.name] = "constexpr"
                    constexprs[param.name] = value
                else:
                    signature[param.name] = _type_of(value)
            self._launches.append(Launch(self._module, self._name, signature, constexprs, num_warps))

        return launch


@contextlib.contextmanager
def _recording(module, launches: list[Launch]):
    """Replaces the module's kernels by recorders and its device check by none (meta tensors)."""
    import triton  # noqa: PLC0415

    saved = dict(vars(module))
    for name, value in saved.items():
        if isinstance(value, triton.runtime.JITFunction) and name.endswith("_kernel"):
            setattr(module, name, _Recorder(module.__name__, name, value, launches))
    module.check_device = lambda *args: None
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def families() -> tuple[str, ...]:
    """Every op family of the registry (invkernels.ops._registry.FAMILIES), each with a Triton module."""
    from invkernels.ops import _registry  # noqa: PLC0415

    return tuple(_registry.FAMILIES)


def triton_module(family: str):
    """The Triton module of ``family``: its ``LAUNCHERS``, ``gpu_configs()`` and ``aot_cases(dtype)``."""
    import importlib  # noqa: PLC0415

    from invkernels.ops import _registry  # noqa: PLC0415

    if family not in _registry.FAMILIES:
        raise ValueError(f"aot: unknown family {family!r}; expected one of {families()}")
    return importlib.import_module(_registry.FAMILIES[family].triton_module)


def _config_fields(config) -> dict:
    """A configuration NamedTuple as launch parameters: ``num_warps``, the others upper-cased."""
    return {("num_warps" if k == "num_warps" else k.upper()): v for k, v in config._asdict().items()}


def launches(names: tuple[str, ...] | None = None, dtypes=DTYPES) -> list[Launch]:
    """Every distinct launch the launchers of the families ``names`` (all by default) make on a GPU,
    for every configuration of their sets. Raises RuntimeError when a configuration of a
    ``gpu_configs()`` is never launched."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("aot: TRITON_INTERPRET=1 is set; ahead-of-time compilation needs the compiled "
                           "Triton (run it in a process without the variable)")
    found: dict[str, Launch] = {}
    for family in names or families():
        module = triton_module(family)
        recorded: list[Launch] = []
        with _recording(module, recorded):
            for dtype in dtypes:
                for op, args in module.aot_cases(dtype):
                    module.LAUNCHERS[op](*args)
        for kernel, configs in module.gpu_configs().items():
            seen = [dict(launch.constexprs, num_warps=launch.num_warps) for launch in recorded if launch.kernel == kernel]
            params = {p.name for p in getattr(module, kernel).params} | {"num_warps"}
            for config in configs:
                # A kernel with square tiles takes block_m for block_n: only its parameters count.
                fields = {k: v for k, v in _config_fields(config).items() if k in params}
                if not any(all(s.get(k) == v for k, v in fields.items()) for s in seen):
                    raise RuntimeError(f"aot: {module.__name__}.{kernel}: configuration {config} is never launched")
        for launch in recorded:
            found.setdefault(launch.key(), launch)
    return list(found.values())


class Compiled(NamedTuple):
    """The result of compiling one launch for one target."""

    key: str
    kernel: str
    arch: str
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    seconds: float


# The options Triton's own ptxas call adds (triton/backends/nvidia/compiler.py, make_cubin), so
# that the register allocation reported is that of the cubin Triton builds.
_TRITON_PTXAS_OPTIONS = ("-lineinfo", "--regAllocOptLevel=2")


def _ptxas_usage(ptx: str, arch: str) -> tuple[int, int, int]:
    """``(registers, spill store bytes, spill load bytes)`` from ``ptxas -v`` on the PTX, with the
    options Triton compiles it with."""
    from triton.knobs import nvidia  # noqa: PLC0415

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w", encoding="utf-8") as f:
            f.write(ptx)
        out = subprocess.run([nvidia.ptxas.path, *_TRITON_PTXAS_OPTIONS, "-v", f"--gpu-name={arch}", path, "-o",
                              os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True, check=True)
    text = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if regs is None or spills is None:
        raise RuntimeError(f"aot: unexpected ptxas -v output: {text[:400]}")
    return int(regs.group(1)), int(spills.group(1)), int(spills.group(2))


def compile_launch(launch: Launch, capability: int) -> Compiled:
    """``triton.compile`` of one launch for ``capability`` (80 or 90), with its ptxas usage."""
    import importlib  # noqa: PLC0415

    import triton  # noqa: PLC0415
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.compiler import ASTSource  # noqa: PLC0415

    fn = getattr(importlib.import_module(launch.module), launch.kernel)
    start = time.perf_counter()
    kernel = triton.compile(ASTSource(fn, signature=launch.signature, constexprs=launch.constexprs),
                            target=GPUTarget("cuda", capability, 32), options={"num_warps": launch.num_warps})
    seconds = time.perf_counter() - start
    regs, stores, loads = _ptxas_usage(kernel.asm["ptx"], TARGETS[capability])
    return Compiled(launch.key(), launch.kernel, TARGETS[capability], regs, stores, loads,
                    int(kernel.metadata.shared), seconds)


def _compile_one(item: tuple[Launch, int]) -> Compiled:
    return compile_launch(*item)


def compile_all(jobs: int = 2, names: tuple[str, ...] | None = None, dtypes=DTYPES) -> list[Compiled]:
    """Every launch of :func:`launches` compiled for every target of :data:`TARGETS`."""
    work = [(launch, cap) for launch in launches(names, dtypes) for cap in TARGETS]
    if jobs <= 1:
        return [_compile_one(item) for item in work]
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(_compile_one, work, chunksize=4))


def summary(results: list[Compiled]) -> str:
    """The build report's line: per kernel the maximum registers over its configurations and
    targets, and the spilling launches."""
    per_kernel: dict[str, int] = {}
    for r in results:
        per_kernel[r.kernel] = max(per_kernel.get(r.kernel, 0), r.registers)
    spilling = [r for r in results if r.spill_stores or r.spill_loads]
    kernels = ", ".join(f"{k.strip('_').removesuffix('_kernel')} {v}" for k, v in sorted(per_kernel.items()))
    line = (f"Triton backend: {len(results)} launches compiled ahead of time for {'/'.join(TARGETS.values())}, "
            f"{len(spilling)} with register spills; max registers per kernel: {kernels}")
    for r in spilling:
        line += f"\n  spills: {r.key} on {r.arch}: {r.spill_stores} bytes stores, {r.spill_loads} bytes loads"
    return line


def _key_sources(names: tuple[str, ...] | None = None) -> list[str]:
    """The files the compiled launches come from: every module of this package (kernels,
    launchers, this module), the families' Triton modules, and the invkernels modules they import
    (argument helpers)."""
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(here))
    sources = {os.path.join(here, n) for n in os.listdir(here) if n.endswith(".py")}
    sources.update(os.path.abspath(triton_module(family).__file__) for family in names or families())
    for path in sorted(sources):
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("invkernels."):
                base = os.path.join(root, *node.module.split("."))
                sources.update(p for p in (base + ".py", os.path.join(base, "__init__.py")) if os.path.exists(p))
    return sorted(sources)


def cache_key(names: tuple[str, ...] | None = None, dtypes=DTYPES) -> str:
    """A hash of what the compiled results depend on: the sources of :func:`_key_sources`, the
    Triton and torch versions, the targets, families and dtypes."""
    digest = hashlib.sha256()
    names = tuple(names or families())
    for path in _key_sources(names):
        digest.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    for dist in ("triton", "torch"):
        digest.update(f"{dist}={importlib.metadata.version(dist)}".encode())
    digest.update(repr((sorted(TARGETS.items()), names, tuple(str(d) for d in dtypes))).encode())
    return digest.hexdigest()[:20]


def compile_cached(cache: str | None, jobs: int, names: tuple[str, ...] | None = None
                   ) -> tuple[list[Compiled], str | None]:
    """:func:`compile_all`, or its results from ``cache`` (a directory) when the sources, versions and
    settings of :func:`cache_key` were compiled before: ``(results, path of the cached results)``."""
    if cache is None:
        return compile_all(jobs, names), None
    path = os.path.join(cache, cache_key(names) + ".json")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return [Compiled(**r) for r in json.load(f)], path
    results = compile_all(jobs, names)
    os.makedirs(cache, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump([r._asdict() for r in results], f, indent=1)
    os.replace(tmp, path)
    return results, None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="compiler processes (default: one per core)")
    parser.add_argument("--json", metavar="PATH", help="write every launch's result to PATH")
    parser.add_argument("--family", choices=families(), action="append", help="only these op families")
    parser.add_argument("--cache", metavar="DIR",
                        help="reuse the results compiled before from the same sources and versions (kept in DIR)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"argument --jobs: should be >= 1, got {args.jobs}")
    start = time.perf_counter()
    results, cached = compile_cached(args.cache, args.jobs, tuple(args.family or families()))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump([r._asdict() for r in results], f, indent=1)
    print(summary(results))
    if cached:
        print(f"  (compiled before from the same sources and versions: {cached})")
    else:
        print(f"  ({time.perf_counter() - start:.0f} s on {args.jobs} processes)")
    return 1 if any(r.spill_stores or r.spill_loads for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
