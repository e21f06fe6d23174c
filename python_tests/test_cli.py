"""The command line (``python -m invkernels``): bad arguments are usage errors (exit 2) found
before anything runs, output paths are checked before training, and finished work survives a
write that fails after training."""

import functools
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import invkernels
from invkernels import demo, invert_demo
from invkernels.__main__ import THREADS_PER_CPU, main
from invkernels.models import Glow


@pytest.fixture
def nothing_runs(monkeypatch):
    """Makes starting a demo, the inversion demo or the benchmarks fail the test at once."""

    def started(*args, **kwargs):
        raise AssertionError("the command started running instead of refusing its arguments")

    monkeypatch.setattr(demo, "run", started)
    monkeypatch.setattr(invert_demo, "run", started)
    monkeypatch.setattr(subprocess, "call", started)


def usage_error(capsys, argv) -> str:
    """``main(argv)``'s stderr, asserting it exited with argparse's usage-error code 2."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["demo", "--threads", "-1"], "argument --threads: should be between 0 and"),
    (["demo", "--threads", "100000000000"], "argument --threads: should be between 0 and"),
    (["invert", "--threads", "-1"], "argument --threads: should be between 0 and"),
    (["invert", "--threads", str(THREADS_PER_CPU * (os.cpu_count() or 1) + 1)],
     f"at most {THREADS_PER_CPU} per logical CPU"),
    (["bench", "--rounds", "-1"], "argument --rounds: should be >= 1, got -1"),
    (["demo", "--seed", "-1"], "argument --seed: should be between 0 and 4294967295, got -1"),
])
def test_bad_numbers_are_usage_errors(nothing_runs, capsys, argv, message):
    err = usage_error(capsys, argv)
    assert message in err and f"got {argv[-1]}" in err


@pytest.mark.parametrize("command", ["demo", "invert"])
def test_out_naming_an_existing_file_is_a_usage_error(nothing_runs, capsys, tmp_path, command):
    (tmp_path / "taken").write_text("a file")
    err = usage_error(capsys, [command, "--out", str(tmp_path / "taken")])
    assert f"--out: the output directory '{tmp_path / 'taken'}' exists and is not a directory" in err
    err = usage_error(capsys, [command, "--out", str(tmp_path / "taken" / "below")])
    assert "cannot be created" in err and "is not a directory" in err


def test_out_holding_a_directory_where_the_checkpoint_goes_fails_before_training(nothing_runs, capsys, tmp_path):
    (tmp_path / "glow_digits.pt").mkdir()
    err = usage_error(capsys, ["demo", "--epochs", "1", "--out", str(tmp_path)])
    assert f"'{tmp_path / 'glow_digits.pt'}' is a directory, but the run writes a file there" in err


def test_demo_with_triton_and_no_gpu_is_refused_unless_interpreting(nothing_runs, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = usage_error(capsys, ["demo", "--backend", "triton", "--out", str(tmp_path)])
    assert "--backend triton: this machine has no CUDA GPU" in err and "TRITON_INTERPRET=1" in err
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(AssertionError, match="started running"):
        main(["demo", "--backend", "triton", "--out", str(tmp_path)])


def test_a_checkpoint_write_failing_after_training_keeps_the_work(capsys, monkeypatch, tmp_path):
    out, spare = tmp_path / "out", tmp_path / "spare"
    spare.mkdir()
    monkeypatch.setattr(demo, "DemoConfig", functools.partial(demo.DemoConfig, steps=1, hidden=8, batch_size=720))
    real_train = demo.train

    def train_then_block_the_checkpoint(*args, **kwargs):
        history = real_train(*args, **kwargs)
        (out / "glow_digits.pt").mkdir()  # the path turns unwritable while training runs
        return history

    monkeypatch.setattr(demo, "train", train_then_block_the_checkpoint)
    monkeypatch.setattr("tempfile.tempdir", str(spare))
    assert main(["demo", "--epochs", "1", "--no-progress", "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert f"{out / 'glow_digits.pt'}: IsADirectoryError" in captured.err
    (saved,) = spare.glob("invkernels-demo-*/glow_digits.pt")
    assert f"saved to {saved}" in captured.err and f"saved it to {saved} instead" in captured.out
    model = Glow.load(saved)
    assert model.saved_metadata["steps"] == 1 and model.saved_metadata["hidden"] == 8
    probe = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.isfinite(model.log_prob(probe)).all()
    results = json.loads((out / "results.json").read_text())
    assert results["files"]["checkpoint"] == str(saved)
    (failure,) = results["write_failures"]
    assert failure["file"] == str(out / "glow_digits.pt") and failure["saved_to"] == str(saved)
    assert failure["error"].startswith("IsADirectoryError")
    assert (out / "samples.png").is_file() and (out / "training_curve.png").is_file()
    assert math.isfinite(results["test_bits_per_dim"]) and len(results["history"]) == 1
    # JSON's own types, not their text: a reader gets the values build_info() returned.
    assert results["build"] == invkernels.build_info()
    assert results["build"]["cpu"] is True and isinstance(results["build"]["cuda"], bool)
    assert isinstance(results["parameters"], int) and isinstance(results["train_seconds"], float)


def test_check_command_exits_zero():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "invkernels", "check"], capture_output=True, text=True, timeout=600,
                         env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "all checks passed" in out.stdout
    assert out.stdout.count(" ok") >= 3 and "FAILED" not in out.stdout
    # The built backends and what runs here are told apart: no bare "cuda: True" above "cuda_available".
    info = invkernels.build_info()
    lines = out.stdout.splitlines()
    assert f"cuda backend built: {info['cuda']}" in lines
    assert f"cuda available (a GPU is visible now): {info['cuda_available']}" in lines
    assert not any(line.startswith(("cuda:", "cuda_available:", "cpu:")) for line in lines)
