"""What the build produced: backends, CPU capability libraries, versions; the compile settings
that setup.py and CMake read from build_config.json; `make gpu-check` (scripts/gpu_check.py)."""

import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

import invkernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(ROOT, "build_config.json"), encoding="utf-8") as _f:
    BUILD_CONFIG = json.load(_f)
CAPABILITIES = [cap["name"] for cap in BUILD_CONFIG["cpu_capabilities"]]


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
            assert info["cuda_archs"] == ";".join(BUILD_CONFIG["cuda_archs"]), info["cuda_archs"]
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


# Runs setup.py with setuptools.setup replaced, so nothing is built: prints the extensions'
# C++ flags and the resolved CUDA archs.
SETUP_CAPTURE = textwrap.dedent("""
    import json, runpy, setuptools
    captured = {}
    setuptools.setup = lambda **kwargs: captured.update(kwargs)
    config = runpy.run_path("setup.py", run_name="__main__")
    print(json.dumps({
        "cxx": {ext.name: ext.extra_compile_args["cxx"] for ext in captured["ext_modules"]},
        "cuda": config["WITH_CUDA"], "cuda_archs": config["CUDA_ARCHS"]}))
""")


def _isa_flags(args):
    return [a for a in args if a.startswith("-m")]


def _defines(args):
    return [a[2:] for a in args if a.startswith("-DCPU_CAPABILITY")]


def test_setup_py_takes_the_capability_flags_and_cuda_archs_from_build_config():
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_CUDA_ARCH_LIST", "INVKERNELS_CUDA_ARCHS")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-c", SETUP_CAPTURE], cwd=ROOT, env=env, capture_output=True, text=True,
                         check=True)
    built = json.loads(out.stdout.strip().splitlines()[-1])
    for cap in BUILD_CONFIG["cpu_capabilities"]:
        cxx = built["cxx"][f"invkernels._cpu_{cap['name'].lower()}"]
        assert _isa_flags(cxx) == cap["flags"], cap["name"]
        assert _defines(cxx) == cap["defines"], cap["name"]
    if built["cuda"]:
        assert built["cuda_archs"] == ";".join(BUILD_CONFIG["cuda_archs"])


def test_the_capability_flags_are_written_only_in_build_config():
    for name in ("setup.py", "CMakeLists.txt"):
        with open(os.path.join(ROOT, name), encoding="utf-8") as f:
            text = f.read()
        for cap in BUILD_CONFIG["cpu_capabilities"]:
            for flag in cap["flags"] + cap["defines"]:
                assert flag not in text, f"{name} spells {flag!r}; it belongs in build_config.json only"


def test_cmake_takes_the_capability_flags_and_cuda_archs_from_build_config(tmp_path):
    if torch.version.cuda and shutil.which("nvcc") is None:
        pytest.skip("CMake cannot configure against a CUDA build of torch without the CUDA toolkit (nvcc)")
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    env.pop("TORCH_CUDA_ARCH_LIST", None)
    out = subprocess.run(["cmake", "-S", ROOT, "-B", str(tmp_path), "-G", "Ninja", f"-DPython3_EXECUTABLE={sys.executable}"],
                         env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    with open(tmp_path / "compile_commands.json", encoding="utf-8") as f:
        commands = json.load(f)
    for cap in BUILD_CONFIG["cpu_capabilities"]:
        target = f"invkernels_cpu_{cap['name'].lower()}.dir"
        args = [c["command"].split() for c in commands if f"/{target}/" in c["command"]]
        assert args, f"CMake made no target {target}"
        for a in args:
            assert _isa_flags(a) == cap["flags"], cap["name"]
            assert _defines(a) == cap["defines"], cap["name"]
    archs = re.search(r"CUDA kernels OFF \(archs ([^)]*)\)", out.stdout)
    if torch.version.cuda:
        assert archs and archs.group(1) == ";".join(BUILD_CONFIG["cuda_archs"]), out.stdout[-2000:]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "scripts", "gpu_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_make_gpu_check_without_a_gpu_exits_at_once_with_no_cuda_device():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    out = subprocess.run(["make", "--no-print-directory", "gpu-check"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode != 0
    assert "gpu-check: no CUDA device (CUDA_VISIBLE_DEVICES='' hides every GPU)" in out.stderr
    assert "building invkernels" not in out.stdout + out.stderr


def test_gpu_check_without_nvidia_smi_reports_no_cuda_device(tmp_path, capsys):
    rc = _gpu_check().main(["--setup", "build", "exit 0"], env={"PATH": str(tmp_path)})
    assert rc == 1
    assert "no CUDA device (nvidia-smi is not on PATH" in capsys.readouterr().err


def _fake_nvidia_smi(directory, output):
    smi = directory / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\nprintf '{output}'\n")
    smi.chmod(0o755)
    return {"PATH": f"{directory}{os.pathsep}{os.environ['PATH']}"}


def test_gpu_check_builds_for_the_visible_archs_on_every_core_and_runs_the_stages(tmp_path):
    env = _fake_nvidia_smi(tmp_path, "NVIDIA H200, 9.0\\nNVIDIA A100-SXM4-80GB, 8.0\\n")
    seen = tmp_path / "seen.json"
    record = (f"{sys.executable} -c \"import json, os; json.dump({{k: os.environ.get(k) for k in "
              f"('MAX_JOBS', 'INVKERNELS_CUDA_ARCHS', 'INVKERNELS_WITH_CUDA')}}, open('{seen}', 'w'))\"")
    rc = _gpu_check().main(["--setup", "build", record, "--stage", "tests", "exit 3",
                            "--stage", "bench", f"touch {tmp_path / 'bench'}"], env=env)
    assert rc == 1
    assert json.loads(seen.read_text()) == {
        "MAX_JOBS": str(os.cpu_count()), "INVKERNELS_CUDA_ARCHS": "8.0;9.0", "INVKERNELS_WITH_CUDA": "1"}
    assert (tmp_path / "bench").exists(), "a failing --stage stopped the stages after it"


def test_gpu_check_stops_after_a_failing_setup_stage(tmp_path, capsys):
    env = _fake_nvidia_smi(tmp_path, "NVIDIA H200, 9.0\\n")
    rc = _gpu_check().main(["--setup", "build", "exit 4", "--stage", "tests", f"touch {tmp_path / 'tests'}"], env=env)
    assert rc == 1
    assert not (tmp_path / "tests").exists()
    assert re.search(r"tests +0\.0 s +not run", capsys.readouterr().out)


def test_parse_gpus_names_each_gpu_and_refuses_other_output():
    gpus = _gpu_check().parse_gpus("NVIDIA H200, 9.0\nNVIDIA H100 80GB HBM3, 9.0\n\n")
    assert gpus == [("NVIDIA H200", "9.0"), ("NVIDIA H100 80GB HBM3", "9.0")]
    with pytest.raises(ValueError, match="parse_gpus: expected 'name, major.minor' per line, got 'No devices were found'"):
        _gpu_check().parse_gpus("No devices were found")


DEVICE_CODE = textwrap.dedent("""
    __global__ void plain(float* x, int n) {
      int i = blockIdx.x * blockDim.x + threadIdx.x;
      if (i < n) x[i] = x[i] * 2.0f + 1.0f;
    }
    __global__ void with_local_array(float* x, const int* idx, int n) {
      float local[64];
      for (int k = 0; k < 64; ++k) local[k] = x[k] * k;
      int i = blockIdx.x * blockDim.x + threadIdx.x;
      if (i < n) x[i] = local[idx[i] & 63];
    }
""")


def _build_report():
    spec = importlib.util.spec_from_file_location("build_report", os.path.join(ROOT, "scripts", "build_report.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_build_report_reads_registers_and_stack_frames_from_the_library_as_ptxas_reports_them(tmp_path):
    """The report reads the device code of a built library (no CUDA tools at report time); here it
    agrees with what ptxas printed when the same library was compiled."""
    if shutil.which("nvcc") is None:
        pytest.skip("needs nvcc to compile a library with device code")
    source = tmp_path / "kernels.cu"
    source.write_text(DEVICE_CODE)
    library = tmp_path / "libkernels.so"
    out = subprocess.run(["nvcc", "-shared", "-Xcompiler", "-fPIC", "-O3", "-Xptxas=-v", "-gencode",
                          "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90", str(source), "-o",
                          str(library)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    printed = {}
    text = out.stdout + out.stderr
    blocks = re.split(r"ptxas info\s*: Compiling entry function ", text)[1:]
    for block in blocks:
        kernel, arch = re.match(r"'(\w+)' for '(sm_\d+)'", block).groups()
        frame = int(re.search(r"(\d+) bytes stack frame", block).group(1))
        regs = int(re.search(r"Used (\d+) registers", block).group(1))
        printed[(kernel, arch)] = (regs, frame)
    read = {(k.name, k.arch): (k.registers, k.frame_bytes) for k in _build_report().device_kernels(str(library))}
    assert len(printed) == 4 and read == printed
    assert all(frame > 0 for (kernel, _), (_, frame) in read.items() if "with_local_array" in kernel)
    assert all(frame == 0 for (kernel, _), (_, frame) in read.items() if "plain" in kernel)


def test_a_library_without_device_code_has_no_device_kernels():
    libraries = glob.glob(os.path.join(ROOT, "invkernels", "_cpu_*.so"))
    assert libraries
    assert _build_report().device_kernels(libraries[0]) == []


def _build_script(monkeypatch, tmp_path):
    spec = importlib.util.spec_from_file_location("build_script", os.path.join(ROOT, "scripts", "build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "STATE", str(tmp_path / "state.json"))
    monkeypatch.setattr(module, "_registered", lambda: True)
    monkeypatch.setattr(module, "_libraries_present", lambda: True)
    monkeypatch.setattr(module, "_gpu_visible", lambda: False)
    for key in module.OPTIONS:
        monkeypatch.delenv(key, raising=False)
    return module


def _record(module, target):
    with open(module.STATE, "w", encoding="utf-8") as f:
        json.dump(dict(module.wanted(target), target=target), f)


def test_a_build_is_up_to_date_until_an_input_or_option_changes(monkeypatch, tmp_path):
    build = _build_script(monkeypatch, tmp_path)
    assert not build.up_to_date("full", build.wanted("full"))
    _record(build, "full")
    assert build.up_to_date("full", build.wanted("full"))
    assert "csrc/kernels/coupling.h" in build.inputs() and "setup.py" in build.inputs()
    touched = build.wanted("full")
    touched["inputs"]["csrc/kernels/coupling.h"][0] += 1
    assert not build.up_to_date("full", touched)
    monkeypatch.setenv("INVKERNELS_CUDA_ARCHS", "9.0")
    assert not build.up_to_date("full", build.wanted("full"))


def test_a_full_build_serves_the_demo_and_a_demo_build_does_not_serve_the_tests(monkeypatch, tmp_path):
    build = _build_script(monkeypatch, tmp_path)
    assert build.target_env("demo") == {"INVKERNELS_CPU_CAPABILITIES": "native", "INVKERNELS_WITH_CUDA": "0"}
    _record(build, "full")
    assert build.up_to_date("demo", build.wanted("demo"))
    _record(build, "demo")
    assert build.up_to_date("demo", build.wanted("demo"))
    assert not build.up_to_date("full", build.wanted("full"))


def test_missing_libraries_or_registration_mean_a_build(monkeypatch, tmp_path):
    build = _build_script(monkeypatch, tmp_path)
    _record(build, "full")
    monkeypatch.setattr(build, "_libraries_present", lambda: False)
    assert not build.up_to_date("full", build.wanted("full"))
    monkeypatch.setattr(build, "_libraries_present", lambda: True)
    monkeypatch.setattr(build, "_registered", lambda: False)
    assert not build.up_to_date("full", build.wanted("full"))
