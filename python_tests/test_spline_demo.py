"""The spline demo (``python -m invkernels demo spline``, invkernels/spline_demo.py): the command
line picks it and refuses bad arguments before anything runs, its settings are checked, a run
writes its files, and every reported number is what the model and the data give when
recomputed here."""

import dataclasses
import functools
import json
import math

import matplotlib.image
import numpy as np
import pytest
import torch

import test_cli
from invkernels import demo, spline_demo
from invkernels.__main__ import main

usage_error = test_cli.usage_error
nothing_runs = test_cli.nothing_runs  # the fixture: demo.run, invert_demo.run and the benchmarks fail at once

# A run of a few steps on few points: seconds, not a fit.
TINY = dict(steps=3, batch_size=32, train_points=64, test_points=32, blocks=1, hidden=8, bins=4, grid=8, samples=16)


@pytest.fixture
def nothing_starts(nothing_runs, monkeypatch):
    """``nothing_runs``, and the spline demo fails the same way (``demo.run`` is its failing stand-in now)."""
    monkeypatch.setattr(spline_demo, "run", demo.run)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    cfg = spline_demo.SplineDemoConfig(**TINY, seed=7, out_dir=str(tmp_path_factory.mktemp("spline") / "out"))
    return cfg, spline_demo.run(cfg, progress=False)


class Started(Exception):
    """Raised by the recording stand-ins of the demos' ``run``: which demo started, with what settings."""


@pytest.fixture
def started_demo(monkeypatch):
    def record(name, cfg, progress=True):
        raise Started(name, cfg)

    monkeypatch.setattr(demo, "run", functools.partial(record, "glow"))
    monkeypatch.setattr(spline_demo, "run", functools.partial(record, "spline"))


def started(argv):
    with pytest.raises(Started) as info:
        main(argv)
    return info.value.args


def test_cli_picks_the_demo(started_demo, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # the default --out is checked (creating nothing) in the working directory
    name, cfg = started(["demo", "spline", "--steps", "5", "--seed", "3", "--backend", "reference", "--out",
                         str(tmp_path)])
    assert name == "spline" and isinstance(cfg, spline_demo.SplineDemoConfig)
    assert (cfg.steps, cfg.seed, cfg.backend, cfg.out_dir) == (5, 3, "reference", str(tmp_path))
    name, cfg = started(["demo", "spline"])
    assert name == "spline" and cfg == spline_demo.SplineDemoConfig()
    # Plain ``demo`` is still the Glow demo, with its own defaults and options.
    name, cfg = started(["demo"])
    assert name == "glow" and cfg == demo.DemoConfig()
    name, cfg = started(["demo", "--epochs", "2", "--out", str(tmp_path)])
    assert name == "glow" and (cfg.epochs, cfg.out_dir) == (2, str(tmp_path))
    assert started(["demo", "glow", "--seed", "4"])[1] == demo.DemoConfig(seed=4)


def test_help_states_the_configs_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"demo spline: training steps (default {spline_demo.SplineDemoConfig().steps})" in text
    assert f"demo glow: training epochs (default {demo.DemoConfig().epochs})" in text


@pytest.mark.parametrize("argv,message", [
    (["demo", "spline", "--steps", "0"], "argument --steps: should be >= 1, got 0"),
    (["demo", "spline", "--seed", "-1"], "argument --seed: should be between 0 and 4294967295, got -1"),
    (["demo", "spline", "--epochs", "2"], "argument --epochs: only demo glow takes it, got 2 for demo spline"),
    (["demo", "--steps", "2"], "argument --steps: only demo spline takes it, got 2 for demo glow"),
    (["demo", "glow", "--steps", "2"], "argument --steps: only demo spline takes it, got 2 for demo glow"),
    (["demo", "moons"], "argument model: invalid choice: 'moons'"),
])
def test_bad_arguments_are_usage_errors(nothing_starts, capsys, argv, message):
    assert message in usage_error(capsys, argv)


def test_out_is_checked_for_the_spline_demos_files(nothing_starts, capsys, tmp_path):
    (tmp_path / "taken").write_text("a file")
    err = usage_error(capsys, ["demo", "spline", "--out", str(tmp_path / "taken")])
    assert f"--out: the output directory '{tmp_path / 'taken'}' exists and is not a directory" in err
    (tmp_path / "spline_moons.png").mkdir()
    err = usage_error(capsys, ["demo", "spline", "--out", str(tmp_path)])
    assert f"'{tmp_path / 'spline_moons.png'}' is a directory, but the run writes a file there" in err
    # The Glow demo's files are not the spline demo's: a directory where the checkpoint would go
    # does not stop it (it starts, and the stand-in fails).
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "glow_digits.pt").mkdir()
    with pytest.raises(AssertionError, match="started running"):
        main(["demo", "spline", "--out", str(tmp_path / "other")])


def test_triton_without_gpu_is_refused_for_the_spline_demo_too(nothing_starts, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = usage_error(capsys, ["demo", "spline", "--backend", "triton", "--out", str(tmp_path)])
    assert "--backend triton: this machine has no CUDA GPU" in err


@pytest.mark.parametrize("name,value,message", [
    ("steps", 0, "steps should be a positive integer, got 0"),
    ("steps", True, "steps should be a positive integer, got True"),
    ("batch_size", 2.5, "batch_size should be a positive integer, got 2.5"),
    ("train_points", 2, "train_points should be an integer >= 3, got 2"),
    ("grid", 1, "grid should be an integer >= 2, got 1"),
    ("bins", 0, "bins should be a positive integer, got 0"),
    ("seed", -1, "seed should be an integer >= 0, got -1"),
    ("seed", 2**32, f"seed should be at most {2**32 - 1} (make_moons' limit), got {2**32}"),
    ("lr", 0.0, "lr should be a finite number > 0, got 0.0"),
    ("lr", math.nan, "lr should be a finite number > 0, got nan"),
    ("noise", -0.1, "noise should be a finite number >= 0, got -0.1"),
    ("tail_bound", "3", "tail_bound should be a finite number > 0, got '3'"),
    ("backend", "cuda", "backend should be one of ('cpp', 'triton', 'reference'), got 'cuda'"),
    ("out_dir", " ", "out_dir should be a directory path, got ' '"),
])
def test_bad_settings_name_the_setting_and_value(name, value, message):
    with pytest.raises(ValueError) as info:
        spline_demo.SplineDemoConfig(**{name: value})
    assert str(info.value) == f"SplineDemoConfig: {message}"


def test_run_checks_out_dir_before_training(monkeypatch, tmp_path):
    def no_training(*args, **kwargs):
        raise AssertionError("trained before checking the output directory")

    monkeypatch.setattr(spline_demo, "train", no_training)
    (tmp_path / "taken").write_text("a file")
    cfg = spline_demo.SplineDemoConfig(**TINY, out_dir=str(tmp_path / "taken"))
    with pytest.raises(ValueError, match="demo spline: the output directory .* exists and is not a directory"):
        spline_demo.run(cfg, progress=False)


def test_run_writes_the_figure_and_the_json(tiny_run):
    cfg, results = tiny_run
    figure = results["files"]["figure"]
    assert figure == f"{cfg.out_dir}/spline_moons.png" and results["write_failures"] == []
    image = matplotlib.image.imread(figure)
    assert image.shape[:2] == (480, 1200)  # 12 x 4.8 inches at 100 dpi: the three panels
    assert image[..., :3].std() > 0.05  # something was drawn
    saved = json.loads(open(f"{cfg.out_dir}/spline_results.json", encoding="utf-8").read())
    expected = json.loads(json.dumps({k: v for k, v in results.items() if k != "model"}))
    assert saved == expected and saved["config"] == dataclasses.asdict(cfg)
    report = spline_demo.report(results)
    assert f"wrote {figure}" in report
    assert f"({TINY['train_points']} train / {TINY['test_points']} test points" in report


def test_reported_numbers_are_the_models_and_the_datas(tiny_run):
    cfg, results = tiny_run
    model = results["model"]
    assert not model.training and results["parameters"] == sum(p.numel() for p in model.parameters())
    train_x, test_x, mean, std = spline_demo.load_moons(cfg)
    assert train_x.shape == (TINY["train_points"], 2) and test_x.shape == (TINY["test_points"], 2)
    torch.testing.assert_close(train_x.mean(0), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(train_x.std(0), torch.ones(2), atol=1e-5, rtol=0)
    assert results["standardization"] == {"mean": mean.tolist(), "std": std.tolist()}
    ll = results["log_likelihood"]
    numbers = [ll["spline_flow"]["train"], ll["spline_flow"]["test"], ll["gaussian"]["train"], ll["gaussian"]["test"],
               results["density"]["in_gap"], *results["density"]["on_moons"].values(),
               results["round_trip_max_abs_error"]]
    assert all(math.isfinite(v) for v in numbers)
    with torch.no_grad():
        assert ll["spline_flow"]["test"] == pytest.approx(model.log_prob(test_x).mean().item(), rel=1e-6, abs=1e-6)
        assert ll["spline_flow"]["train"] == pytest.approx(model.log_prob(train_x).mean().item(), rel=1e-6, abs=1e-6)
        moons = (torch.tensor(spline_demo.MOON_POINTS) - mean) / std
        gap = (torch.tensor([spline_demo.GAP_POINT]) - mean) / std
        assert list(results["density"]["on_moons"].values()) == pytest.approx(model.log_prob(moons).exp().tolist(),
                                                                              rel=1e-5)
        assert results["density"]["in_gap"] == pytest.approx(model.log_prob(gap).exp().item(), rel=1e-5)
        round_trip = (model.inverse(model(test_x)[0]) - test_x).abs().max().item()
    assert results["round_trip_max_abs_error"] == pytest.approx(round_trip) and round_trip < 1e-4
    assert results["density"]["ratio_moons_to_gap"] == pytest.approx(
        min(results["density"]["on_moons"].values()) / results["density"]["in_gap"])
    # The last history entry is the finished model: the same test log-likelihood.
    assert [h["step"] for h in results["history"]] == [1, 2, 3]
    assert results["history"][-1]["test_log_likelihood"] == pytest.approx(ll["spline_flow"]["test"], rel=1e-6)


def test_gaussian_baseline_is_the_maximum_likelihood_gaussian(tiny_run):
    cfg, results = tiny_run
    train_x, test_x, _, _ = spline_demo.load_moons(cfg)
    a, b = train_x.double().numpy(), test_x.double().numpy()
    mean, cov = a.mean(0), np.cov(a.T, bias=True)

    def mean_log_density(x):
        d = x - mean
        return float(np.mean(-0.5 * np.einsum("ni,ij,nj->n", d, np.linalg.inv(cov), d)
                             - 0.5 * np.log(np.linalg.det(2 * np.pi * cov))))

    gauss = results["log_likelihood"]["gaussian"]
    assert gauss["train"] == pytest.approx(mean_log_density(a), rel=1e-9)
    assert gauss["test"] == pytest.approx(mean_log_density(b), rel=1e-9)


def test_a_short_fit_shows_two_moons(tmp_path):
    """300 steps of a small flow already put far more density on the moons than in the gap between
    them, where the Gaussian (one blob) has more density than on the moons, and beat the Gaussian's
    test log-likelihood by over a nat."""
    cfg = spline_demo.SplineDemoConfig(steps=300, blocks=2, hidden=32, train_points=1000, test_points=200, grid=8,
                                       samples=10, out_dir=str(tmp_path))
    results = spline_demo.run(cfg, progress=False)
    assert results["density"]["ratio_moons_to_gap"] > 3
    ll = results["log_likelihood"]
    assert ll["spline_flow"]["test"] > ll["gaussian"]["test"] + 1.0
    train_x, _, mean, std = spline_demo.load_moons(cfg)
    gauss = torch.distributions.MultivariateNormal(train_x.mean(0), torch.cov(train_x.T, correction=0))
    on_moons = gauss.log_prob((torch.tensor(spline_demo.MOON_POINTS) - mean) / std).exp()
    in_gap = gauss.log_prob((torch.tensor([spline_demo.GAP_POINT]) - mean) / std).exp()
    assert on_moons.max() < in_gap


def test_cli_runs_the_spline_demo_and_keeps_work_when_a_write_fails(capsys, monkeypatch, tmp_path):
    out, spare = tmp_path / "out", tmp_path / "spare"
    spare.mkdir()
    monkeypatch.setattr(spline_demo, "SplineDemoConfig", functools.partial(spline_demo.SplineDemoConfig, **{
        k: v for k, v in TINY.items() if k != "steps"}))
    real_train = spline_demo.train

    def train_then_block_the_figure(*args, **kwargs):
        history = real_train(*args, **kwargs)
        (out / "spline_moons.png").mkdir()  # the path turns unwritable while training runs
        return history

    monkeypatch.setattr(spline_demo, "train", train_then_block_the_figure)
    monkeypatch.setattr("tempfile.tempdir", str(spare))
    assert main(["demo", "spline", "--steps", "2", "--seed", "5", "--no-progress", "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "NeuralSplineFlow on scikit-learn's two moons" in captured.out
    (saved,) = spare.glob("invkernels-demo-*/spline_moons.png")
    assert f"{out / 'spline_moons.png'}: IsADirectoryError" in captured.err and f"saved to {saved}" in captured.err
    assert matplotlib.image.imread(saved).shape[:2] == (480, 1200)
    results = json.loads((out / "spline_results.json").read_text())
    assert results["files"]["figure"] == str(saved) and results["config"]["steps"] == 2
    assert results["config"]["seed"] == 5 and len(results["history"]) == 2
    (failure,) = results["write_failures"]
    assert failure["file"] == str(out / "spline_moons.png") and failure["error"].startswith("IsADirectoryError")
