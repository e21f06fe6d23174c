"""An op family is added by its descriptor alone (invkernels.ops._registry): a throwaway family
(toy_family.py, loaded into fresh processes) enters the op matrix wherever the package's ops do,
gets its Triton twins, and joins the ahead-of-time list, without any table of the tests or the
package naming it."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.join(ROOT, "python_tests")


def _env(**extra):
    env = dict(os.environ, **extra)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, os.environ.get("PYTHONPATH")) if p)
    return env


def _pytest(*args):
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "toy_family", "-p", "no:cacheprovider", *args],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)


def _functions(ids, op):
    """The test functions with a collected case of ``op``."""
    return {i.split("[", 1)[0] for i in ids if re.search(rf"[\[-]{op}[-\]]", i)}


def test_a_family_made_from_its_descriptor_enters_every_test_of_the_matrix_and_passes():
    files = ["python_tests/test_op_matrix.py", "python_tests/test_triton_twins.py"]
    collected = _pytest("--collect-only", "-q", *files)
    assert collected.returncode == 0, collected.stdout[-3000:] + collected.stderr[-3000:]
    ids = [line.strip() for line in collected.stdout.splitlines() if "::" in line]
    package = _functions(ids, "affine_coupling_fwd")
    toy = _functions(ids, "toy_scale_fwd")
    assert package and toy == package, sorted(package ^ toy)
    assert _functions(ids, "toy_scale_bwd")

    run = _pytest("-q", "-rs", *files, "-k", "toy_scale or every_registered_op or every_cpp_op")
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-3000:]
    summary = run.stdout.strip().splitlines()[-1]
    passed = int(re.search(r"(\d+) passed", summary).group(1))
    assert passed >= 2 * len(toy) and "failed" not in summary and "error" not in summary, summary
    skipped = re.findall(r"SKIPPED \[\d+\] (\S+): (.*)", run.stdout)
    assert all(reason == "needs a CUDA GPU" for _, reason in skipped), skipped


def test_a_family_made_from_its_descriptor_is_compiled_ahead_of_time():
    script = ("import toy_family\n"
              "from invkernels.triton import aot\n"
              "assert 'toy' in aot.families(), aot.families()\n"
              "results = aot.compile_all(1, ('toy',))\n"
              "print(aot.summary(results))\n")
    env = _env()
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "toy_scale" in out.stdout and "0 with register spills" in out.stdout, out.stdout


def test_a_registered_op_without_a_descriptor_fails_the_matrix():
    script = ("import torch, invkernels\n"
              "library = torch.library.Library('invkernels', 'FRAGMENT')\n"
              "library.define('orphan_fwd(Tensor x) -> Tensor')\n"
              "import test_op_matrix\n"
              "try:\n"
              "    test_op_matrix.test_every_registered_op_has_a_complete_descriptor()\n"
              "except AssertionError as e:\n"
              "    print('refused:', 'orphan_fwd' in str(e))\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_env(TRITON_INTERPRET="1"),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "refused: True", out.stdout
