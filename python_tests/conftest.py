import os

# The Triton backend runs on CPU tensors through the interpreter. The variable must be set before
# triton is first imported (invkernels imports it lazily). `make gpu-check` sets
# INVKERNELS_TEST_CUDA=1 to run the cuda-marked tests with Triton compiled for the GPU instead.
if os.environ.get("INVKERNELS_TEST_CUDA") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import invkernels  # noqa: E402,F401


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    no_interpreter = pytest.mark.skip(reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    for item in items:
        if "cuda" in item.keywords:
            if not torch.cuda.is_available():
                item.add_marker(no_gpu)
        elif "triton" in item.keywords and not interpreting:
            item.add_marker(no_interpreter)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _auto_runs_memory_free(monkeypatch):
    """``memory_free="auto"`` (the chains' and models' default) runs memory-free on the tests' tiny
    inputs, which it would store otherwise: the tests written for the memory-free path keep
    testing it. test_auto_memory_free.py sets the threshold it checks on its chains."""
    monkeypatch.setattr(invkernels.nn.InvertibleSequential, "auto_memory_free_bytes", 0)
