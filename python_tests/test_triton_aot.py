"""Every Triton kernel compiles ahead of time for sm_80 and sm_90, in every configuration its
launcher can launch with on a GPU, without register spills (invkernels.triton.aot; no GPU needed).

The compilation runs in a subprocess without ``TRITON_INTERPRET``: this test process interprets.
It reuses the results that `make build` compiled from the same sources and versions (the cache
under build/triton-aot/, keyed by :func:`aot.cache_key`), and compiles when there are none."""

import json
import os
import subprocess
import sys

import pytest

from invkernels.triton import aot, coupling

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The Triton module of every op family (invkernels.ops._registry.FAMILIES).
MODULES = tuple(aot.triton_module(family) for family in aot.families())



def kernel_names(module):
    return {name for name, value in vars(module).items() if name.endswith("_kernel") and callable(value)}


@pytest.mark.parametrize("module", MODULES, ids=lambda m: m.__name__.rsplit(".", 1)[1])
def test_every_kernel_of_a_module_has_its_gpu_configurations(module):
    configs = module.gpu_configs()
    assert set(configs) == kernel_names(module)
    assert all(len(c) >= 1 for c in configs.values())


def test_every_kernel_compiles_for_both_targets_in_every_configuration(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "aot.json"
    proc = subprocess.run([sys.executable, "-m", "invkernels.triton.aot", "--json", str(out),
                           "--cache", os.path.join(ROOT, "build", "triton-aot")], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    assert {r["kernel"] for r in results} == set().union(*(kernel_names(m) for m in MODULES))
    by_key = {}
    for r in results:
        by_key.setdefault(r["key"], set()).add(r["arch"])
        assert r["registers"] > 0
        assert (r["spill_stores"], r["spill_loads"]) == (0, 0), r
    assert all(archs == set(aot.TARGETS.values()) for archs in by_key.values())
    assert "Triton backend:" in proc.stdout and "0 with register spills" in proc.stdout


def test_compiling_under_the_interpreter_is_refused():
    assert os.environ.get("TRITON_INTERPRET") == "1"
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1 is set"):
        aot.launches()


def test_the_cache_key_follows_the_sources_versions_and_settings(tmp_path, monkeypatch):
    key = aot.cache_key()
    assert key == aot.cache_key()
    assert aot.cache_key(("coupling",)) != key
    assert aot.cache_key(dtypes=(aot.DTYPES[0],)) != key
    sources = aot._key_sources()
    assert os.path.abspath(coupling.__file__) in sources and os.path.abspath(aot.__file__) in sources
    # The helpers the launchers import from the rest of the package count too.
    assert any(p.endswith(os.path.join("invkernels", "_validation.py")) for p in sources)
    edited = tmp_path / "coupling.py"
    edited.write_text(open(coupling.__file__, encoding="utf-8").read() + "\n# edited\n")
    monkeypatch.setattr(aot, "_key_sources", lambda names: [str(edited) if p == os.path.abspath(coupling.__file__)
                                                            else p for p in sources])
    assert aot.cache_key() != key


def test_a_cached_result_is_returned_without_compiling(tmp_path, monkeypatch):
    result = aot.Compiled("k[]()", "_k_kernel", "sm_80", 32, 0, 0, 0, 0.1)
    calls = []
    monkeypatch.setattr(aot, "compile_all", lambda jobs, names: calls.append(names) or [result])
    first, cached = aot.compile_cached(str(tmp_path), 1, ("coupling",))
    assert (first, cached, len(calls)) == ([result], None, 1)
    again, cached = aot.compile_cached(str(tmp_path), 1, ("coupling",))
    assert again == [result] and cached is not None and len(calls) == 1
