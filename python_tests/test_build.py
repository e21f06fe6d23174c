"""What the build produced: backends, CPU capability libraries, versions."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import invkernels

CAPABILITIES = ["DEFAULT", "AVX2", "AVX512"]


def test_build_info_reports_the_backends_and_versions():
    info = invkernels.build_info()
    assert info["cpu"] is True
    assert info["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert info["cpu_library"].startswith("_cpu_" + info["cpu_capability"].lower())
    assert info["torch_version_built"] == torch.__version__.split("+")[0]
    assert info["cuda_available"] == torch.cuda.is_available()
    if info["cuda"]:
        assert info["cuda_archs"]
    if os.environ.get("INVKERNELS_EXPECT_CUDA_BUILD") == "1":
        assert info["cuda"], "nvcc and a CUDA torch are present but the CUDA backend was not compiled"
        if not torch.cuda.is_available():
            assert "8.0" in info["cuda_archs"] and "9.0" in info["cuda_archs"], info["cuda_archs"]
        assert hasattr(torch.ops.invkernels.affine_coupling_fwd.default, "_schema")
        assert torch._C._dispatch_has_kernel_for_dispatch_key("invkernels::affine_coupling_fwd", "CUDA")


SCRIPT = textwrap.dedent("""
    import torch, invkernels
    from invkernels.reference import coupling as R
    torch.manual_seed(0)
    x = torch.randn(3, 7, 5, 9)
    h = torch.randn(3, 8, 5, 9)
    err = 0.0
    for scale in ("exp", "sigmoid"):
        y, logdet = torch.ops.invkernels.affine_coupling_fwd(x, h, scale, 2.0)
        y_ref, logdet_ref = R.affine_coupling_fwd(x.double(), h.double(), scale, 2.0)
        err = max(err, (y - y_ref).abs().max().item(), (logdet - logdet_ref).abs().max().item() / 180)
    print(invkernels.build_info()["cpu_library"], err)
""")


@pytest.mark.parametrize("capability", CAPABILITIES)
def test_each_cpu_capability_build_matches_the_reference(capability):
    native = torch.backends.cpu.get_cpu_capability()
    if native not in CAPABILITIES or CAPABILITIES.index(capability) > CAPABILITIES.index(native):
        pytest.skip(f"this CPU supports up to {native}, not {capability}")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability.lower())
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    library, err = out.stdout.split()
    assert library.startswith(f"_cpu_{capability.lower()}.")
    assert float(err) < 1e-5
