"""``import invkernels`` stays light: torch._dynamo (a second of import time, which imports Triton
itself) and Triton are imported when used (a chain built, the Triton backend chosen), not at
import."""

import json
import subprocess
import sys


def _modules_after(code: str) -> dict:
    script = code + "\nimport json, sys\nprint(json.dumps({m: m in sys.modules for m in ('torch._dynamo', 'triton')}))"
    out = subprocess.run([sys.executable, "-c", script], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_loads_neither_dynamo_nor_triton():
    assert _modules_after("import invkernels") == {"torch._dynamo": False, "triton": False}


def test_a_chain_prepares_its_compile_boundary_when_built():
    loaded = _modules_after("import invkernels\nfrom invkernels.nn import InvertibleSequential, Permute\n"
                            "InvertibleSequential(Permute(4))")
    assert loaded["torch._dynamo"]
