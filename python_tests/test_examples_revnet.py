"""examples/revnet_backbone.py: the RevNet-style classifier with a memory-free reversible backbone
(docs/examples/revnet_backbone.md), run in-process on tiny settings."""

import json

import pytest
import torch
import torch.nn.functional as F

from invkernels.nn import InvertibleSequential, ReversibleBlock, Squeeze

from example_scripts import load_example


example = load_example("revnet_backbone")

TINY = ["--epochs", "4", "--batch-size", "32", "--lr", "5e-3", "--channels", "4", "--blocks", "1", "--hidden", "16",
        "--train-size", "256"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("revnet") / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            yield example.main([*TINY, "--out", str(out)]), out
    finally:
        torch.set_num_threads(threads)


def test_training_learns(tiny_run):
    results, _ = tiny_run
    assert results["last_epoch_loss"] < 0.8 * results["first_step_loss"]
    assert results["train_accuracy"] > 0.3  # 10 classes: chance is 0.1
    assert results["steps"] == 4 * 8


def test_memory_free_keeps_less_and_does_not_grow_with_depth(tiny_run):
    results, _ = tiny_run
    saved = results["saved_bytes"]
    assert saved["memory_free"] < saved["stored"]
    # The backbone alone keeps only its output: 32 images x (4 * 4**2) channels x 2 x 2, float32.
    assert results["backbone_saved_bytes"]["memory_free"] == 32 * 64 * 2 * 2 * 4
    sweep = results["saved_bytes_by_depth"]
    assert [r["blocks_per_stage"] for r in sweep] == list(example.DEPTHS)
    assert len({r["memory_free"] for r in sweep}) == 1
    assert all(a["stored"] < b["stored"] for a, b in zip(sweep, sweep[1:]))
    assert results["gradient_difference"] < 1e-10


def test_files_are_written(tiny_run):
    results, out = tiny_run
    assert results["files"] == {"figure": str(out / example.FIGURE), "results": str(out / example.RESULTS)}
    with open(results["files"]["figure"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(results["files"]["results"], encoding="utf-8") as f:
        written = json.load(f)
    assert written["test_accuracy"] == results["test_accuracy"]
    assert len(written["history"]) == 4


def test_the_backbone_is_stages_of_reversible_blocks_with_squeezes_between():
    model = example.RevNetClassifier(channels=6, blocks=3, stages=3, hidden=8)
    layers = list(model.backbone)
    assert isinstance(model.backbone, InvertibleSequential) and model.backbone.memory_free is True
    assert [type(m).__name__ for m in layers] == ["ReversibleBlock"] * 3 + ["Squeeze"] + ["ReversibleBlock"] * 3 \
        + ["Squeeze"] + ["ReversibleBlock"] * 3
    assert [m.channels for m in layers if isinstance(m, ReversibleBlock)] == [6] * 3 + [24] * 3 + [96] * 3
    assert sum(isinstance(m, Squeeze) for m in layers) == 2
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, example.CLASSES)


def test_memory_free_gradients_equal_stored_in_float64():
    torch.manual_seed(0)
    model = example.RevNetClassifier(channels=4, blocks=2, stages=3, hidden=8).double()
    with torch.no_grad():  # the subnets' last layers start at zero: randomize every block (activations of order 1)
        for p in model.backbone.parameters():
            p.copy_(0.1 * torch.randn_like(p))
    x = torch.rand(5, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 3, 7, 9, 3])
    grads = {}
    for memory_free in (True, False):
        model.backbone.memory_free = memory_free
        loss = F.cross_entropy(model(x), y)
        grads[memory_free] = torch.autograd.grad(loss, [x, *model.parameters()])
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert grads[False][0].abs().max() > 0  # the input gradient goes through the whole backbone


@pytest.mark.parametrize("argv, message", [
    (["--channels", "1"], "argument --channels: should be at least 2"),
    (["--stages", "5"], "argument --stages: should be at most 4"),
    (["--epochs", "0"], "argument --epochs: should be a positive integer, got '0'"),
    (["--lr", "nan"], "argument --lr: should be a positive finite number, got 'nan'"),
    (["--seed", "-1"], "argument --seed: should be an integer >= 0, got '-1'"),
])
def test_bad_arguments_name_the_option(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        example.main([*argv, "--out", str(tmp_path)])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_an_output_path_that_is_a_file_is_refused(capsys, tmp_path):
    path = tmp_path / "a_file"
    path.write_text("")
    with pytest.raises(SystemExit):
        example.main(["--out", str(path)])
    assert "argument --out:" in capsys.readouterr().err
    assert not (tmp_path / example.FIGURE).exists()
