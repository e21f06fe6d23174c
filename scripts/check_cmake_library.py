"""ctest check of the CMake build: loads its `_C` and one of its CPU libraries into torch and runs
the CPU kernels.

The Python package is not imported: it would register the op schemas a second time. Checks that
every op of the namespace has a CPU kernel (and a CUDA kernel when the build has CUDA), that
`_C.build_info()` says whether CUDA was compiled, and that the forward and inverse kernels of the
coupling, ActNorm and 1x1 convolution ops invert each other with opposite log-determinants.
Exits with 77 (ctest's skip code here) when this CPU lacks the library's capability.

    python scripts/check_cmake_library.py --ops build/_C.so --cpu build/libinvkernels_cpu_avx2.so \
        --capability AVX2 --cuda 0
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

import torch

SKIP = 77
CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build_config.json")


def cpu_supports(capability: str) -> bool:
    """Whether this CPU runs code built for ``capability`` (build_config.json lists them in
    increasing order; torch reports the highest this CPU has)."""
    with open(CONFIG, encoding="utf-8") as f:
        names = [cap["name"] for cap in json.load(f)["cpu_capabilities"]]
    if capability not in names:
        raise SystemExit(f"check_cmake_library: --capability should be one of {names}, got {capability!r}")
    native = torch.backends.cpu.get_cpu_capability()
    highest = names.index(native) if native in names else 0
    return names.index(capability) <= highest


def load(ops_path: str, cpu_path: str):
    """Import the `_C` module at ``ops_path`` (it defines the schemas) and load ``cpu_path``."""
    spec = importlib.util.spec_from_file_location("_C", ops_path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.ops.load_library(cpu_path)
    return module


def check_registrations(with_cuda: bool) -> list[str]:
    """Every invkernels op has a CPU kernel, and a CUDA kernel when CUDA was compiled."""
    names = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("invkernels::"))
    assert names, "no invkernels:: ops were registered by the CMake-built _C"
    keys = ["CPU", "CUDA"] if with_cuda else ["CPU"]
    missing = [f"{n} ({k})" for n in names for k in keys if not torch._C._dispatch_has_kernel_for_dispatch_key(n, k)]
    assert not missing, f"ops without a kernel in the CMake build: {missing}"
    return names


def check_round_trips(dtype: torch.dtype) -> None:
    """Forward then inverse gives the input back, and the log-determinants cancel."""
    ops = torch.ops.invkernels
    close = torch.testing.assert_close
    x = torch.randn(2, 7, 3, 5, dtype=dtype)
    for scale in ("exp", "sigmoid"):
        h = torch.randn(2, 8, 3, 5, dtype=dtype)
        y, logdet = ops.affine_coupling_fwd(x, h, scale, 2.0)
        x_back, logdet_inv = ops.affine_coupling_inv(y, h, scale, 2.0)
        close(x_back, x)
        close(logdet_inv, -logdet)
        assert logdet.abs().min() > 0, f"affine_coupling_fwd({scale}) gave a zero log-determinant"
    h = torch.randn(2, 4, 3, 5, dtype=dtype)
    close(ops.additive_coupling_inv(ops.additive_coupling_fwd(x, h), h), x)

    bias, log_scale = torch.randn(7, dtype=dtype), 0.1 * torch.randn(7, dtype=dtype)
    y, logdet = ops.actnorm_fwd(x, bias, log_scale)
    x_back, logdet_inv = ops.actnorm_inv(y, bias, log_scale)
    close(x_back, x)
    close(logdet_inv, -logdet)

    perm = torch.randperm(7)
    lower, upper = 0.3 * torch.randn(7, 7, dtype=dtype), 0.3 * torch.randn(7, 7, dtype=dtype)
    sign = torch.where(torch.rand(7) < 0.5, -1.0, 1.0).to(dtype)
    log_s = 0.1 * torch.randn(7, dtype=dtype)
    weight = ops.invconv_weight(perm, lower, upper, sign, log_s)
    close(torch.linalg.slogdet(weight.double()).logabsdet, log_s.double().sum(), rtol=1e-5, atol=1e-5)
    close(ops.conv1x1(ops.conv1x1(x, weight), torch.linalg.inv(weight)), x, rtol=1e-4, atol=1e-4)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", required=True, help="the CMake-built _C module")
    parser.add_argument("--cpu", required=True, help="the CMake-built CPU library")
    parser.add_argument("--capability", required=True, help="the capability it was built for (build_config.json)")
    parser.add_argument("--cuda", type=int, choices=(0, 1), required=True, help="1 when CUDA was compiled")
    args = parser.parse_args(argv)
    if not cpu_supports(args.capability):
        print(f"skipped: this CPU ({torch.backends.cpu.get_cpu_capability()}) cannot run {args.capability} code")
        return SKIP
    module = load(args.ops, args.cpu)
    info = module.build_info()
    assert info["cuda"] == bool(args.cuda), f"_C.build_info()['cuda'] is {info['cuda']}, the build has --cuda {args.cuda}"
    names = check_registrations(bool(args.cuda))
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        check_round_trips(dtype)
    print(f"{os.path.basename(args.cpu)} + {os.path.basename(args.ops)}: {len(names)} ops with kernels, "
          f"round trips pass (float32, float64); build_info {info}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
