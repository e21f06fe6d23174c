"""The worked examples examples/toy_density.py and examples/glow_digits.py (docs/examples/), run
in-process through their ``main(argv)`` on tiny settings: the files they write, the numbers they
return checked against what the model, the data and the checkpoint give, and their usage errors."""

import math
import os

import pytest
import torch

from invkernels.models import RealNVP

from example_scripts import load_example


toy_density = load_example("toy_density")
glow_digits = load_example("glow_digits")

TOY_TINY = ["--steps", "150", "--batch-size", "128", "--blocks", "3", "--hidden", "32", "--train-points", "1000",
            "--test-points", "300", "--grid", "16", "--samples", "200", "--no-progress"]
GLOW_TINY = ["--epochs", "2", "--train-images", "96", "--batch-size", "32", "--steps-per-level", "1", "--hidden", "8",
             "--samples", "4", "--no-progress"]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_toy_density_trains_draws_and_reloads(tmp_path, capsys):
    results = toy_density.main([*TOY_TINY, "--seed", "3", "--out", str(tmp_path)])
    assert os.path.getsize(tmp_path / toy_density.FIGURE) > 0
    assert os.path.getsize(tmp_path / toy_density.CHECKPOINT) > 0
    assert results["files"] == {"figure": str(tmp_path / toy_density.FIGURE),
                                "checkpoint": str(tmp_path / toy_density.CHECKPOINT)}
    for key in ("test_nll", "gaussian_test_nll", "first_train_nll", "last_train_nll"):
        assert math.isfinite(results[key]), (key, results[key])
    assert results["last_train_nll"] < results["first_train_nll"] - 0.3
    assert results["samples_finite"] and results["reload_identical"]

    # The held-out points again, and two baselines computed here: the isotropic Gaussian with the
    # data's variance, and the best full-covariance Gaussian (what the script reports).
    data = toy_density.make_data("ring", 1300, 3)
    train_x, test_x = data[:1000], data[1000:]
    variance = train_x.var(0, unbiased=False).mean().item()
    isotropic = (0.5 * test_x.sub(train_x.mean(0)).square().sum(1) / variance
                 + math.log(2 * math.pi * variance)).mean().item()
    full = torch.distributions.MultivariateNormal(train_x.double().mean(0), torch.cov(train_x.double().T, correction=0))
    assert results["gaussian_test_nll"] == pytest.approx(-full.log_prob(test_x.double()).mean().item(), rel=1e-9)
    assert results["test_nll"] < min(isotropic, results["gaussian_test_nll"]) - 0.3

    # The checkpoint is the trained model: reloaded, it gives the reported held-out NLL, and twice the same.
    loaded = RealNVP.load(tmp_path / toy_density.CHECKPOINT)
    with torch.no_grad():
        log_p = loaded.log_prob(test_x)
        assert torch.equal(log_p, RealNVP.load(tmp_path / toy_density.CHECKPOINT).log_prob(test_x))
    assert -log_p.mean().item() == pytest.approx(results["test_nll"], abs=1e-6)
    assert loaded.saved_metadata == {"dataset": "ring", "steps": 150, "seed": 3}

    out = capsys.readouterr().out
    assert f"held-out NLL: RealNVP {results['test_nll']:.3f}" in out
    assert "RealNVP.load gives identical log_prob: True" in out


def test_toy_density_moons(tmp_path):
    results = toy_density.main([*TOY_TINY, "--dataset", "moons", "--out", str(tmp_path)])
    assert math.isfinite(results["test_nll"]) and results["test_nll"] < results["gaussian_test_nll"]
    assert results["reload_identical"]


def test_glow_digits_trains_memory_free_and_measures_saved_bytes(tmp_path, capsys):
    results = glow_digits.main([*GLOW_TINY, "--out", str(tmp_path)])
    assert os.path.getsize(tmp_path / glow_digits.FIGURE) > 0
    assert results["files"] == {"samples": str(tmp_path / glow_digits.FIGURE)}
    assert math.isfinite(results["test_bpd"]) and results["test_bpd"] > 0
    assert math.isfinite(results["gaussian_test_bpd"]) and results["gaussian_test_bpd"] > 0
    assert len(results["epoch_train_bpd"]) == 2 and all(math.isfinite(b) for b in results["epoch_train_bpd"])
    assert results["samples_finite"]
    assert 0 < results["saved_bytes_memory_free"] < results["saved_bytes_stored"]
    out = capsys.readouterr().out
    assert f"test bits/dim: Glow {results['test_bpd']:.3f}" in out
    assert f"memory-free {results['saved_bytes_memory_free']:>10,} bytes" in out


def test_glow_digits_saved_bytes_do_not_grow_with_depth(tmp_path):
    """Memory-free, a step keeps the same bytes at 1 and 3 Glow steps per level; stored, more."""
    shallow = glow_digits.main([*GLOW_TINY, "--epochs", "1", "--out", str(tmp_path / "shallow")])
    deep = glow_digits.main([*GLOW_TINY, "--epochs", "1", "--steps-per-level", "3", "--out", str(tmp_path / "deep")])
    assert deep["saved_bytes_memory_free"] == shallow["saved_bytes_memory_free"]
    assert deep["saved_bytes_stored"] > 2 * shallow["saved_bytes_stored"]


@pytest.mark.parametrize("example, argv, option", [
    ("toy_density", ["--steps", "0"], "--steps"),
    ("toy_density", ["--batch-size", "two"], "--batch-size"),
    ("toy_density", ["--lr", "nan"], "--lr"),
    ("toy_density", ["--train-points", "2"], "--train-points"),
    ("toy_density", ["--grid", "1"], "--grid"),
    ("toy_density", ["--dataset", "spiral"], "--dataset"),
    ("toy_density", ["--seed", "-1"], "--seed"),
    ("glow_digits", ["--epochs", "0"], "--epochs"),
    ("glow_digits", ["--levels", "4"], "--levels"),
    ("glow_digits", ["--hidden", "-8"], "--hidden"),
    ("glow_digits", ["--temperature", "-1"], "--temperature"),
    ("glow_digits", ["--train-images", "x"], "--train-images"),
])
def test_a_bad_argument_is_a_usage_error_naming_it(example, argv, option, tmp_path, capsys):
    module = {"toy_density": toy_density, "glow_digits": glow_digits}[example]
    with pytest.raises(SystemExit) as exit_info:
        module.main([*argv, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert f"argument {option}" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("module", [toy_density, glow_digits], ids=["toy_density", "glow_digits"])
def test_an_out_that_is_a_file_is_a_usage_error(module, tmp_path, capsys):
    path = tmp_path / "taken"
    path.write_text("")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--out", str(path)])
    assert exit_info.value.code == 2
    assert "argument --out" in capsys.readouterr().err
