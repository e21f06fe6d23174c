"""Inversion of ordinary networks (invkernels.inversion) and the invertible residual block."""

import math

import pytest
import torch
from torch import nn

from invkernels import inversion
from invkernels.nn import InvertibleResidual, InvertibleSequential


def test_injective_linear_layer_is_recovered():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Identity()).double()
    x0 = torch.randn(4, 6, dtype=torch.float64)
    result = inversion.invert(model, "0", x0=x0, optimizer="lbfgs", lr=1.0, steps=200, tol=0, seed=0)
    assert result.input_error.max().item() < 1e-4
    assert result.feature_error.max().item() < 1e-6
    assert result.psnr.min().item() > 60
    # L-BFGS is a batch method: one line search, one stop rule, the same count for every sample.
    assert result.iterations.dtype == torch.int64 and result.iterations.shape == (4,)
    assert (result.iterations == result.iterations[0]).all() and result.iterations[0] <= 200
    assert result.history.shape == (result.iterations[0], 4)
    early = inversion.invert(model, "0", x0=x0, optimizer="lbfgs", lr=1.0, steps=200, tol=1e-3, seed=0)
    assert (early.iterations < result.iterations).all()


def test_alpha_norm_and_total_variation_match_hand_computation():
    x = torch.tensor([[[[1.0, -2.0], [0.5, 3.0]]]], dtype=torch.float64, requires_grad=True)
    assert inversion.alpha_norm(x, 3.0).item() == pytest.approx(1 + 8 + 0.125 + 27)
    (g,) = torch.autograd.grad(inversion.alpha_norm(x, 3.0).sum(), x)
    torch.testing.assert_close(g, 3 * x.detach().abs().square() * x.detach().sign())
    # One pixel has both forward differences: dx = -2 - 1 = -3, dy = 0.5 - 1 = -0.5.
    tv = inversion.total_variation(x, 1.0)
    assert tv.item() == pytest.approx(math.sqrt(9 + 0.25))
    (g,) = torch.autograd.grad(tv.sum(), x)
    r = math.sqrt(9.25)
    expected = torch.tensor([[[[(3 + 0.5) / r, -3 / r], [-0.5 / r, 0.0]]]], dtype=torch.float64)
    torch.testing.assert_close(g, expected)
    assert inversion.total_variation(x, 2.0).item() == pytest.approx(9.25)
    v = torch.tensor([[1.0, 3.0, 2.0]], dtype=torch.float64)
    assert inversion.total_variation(v, 2.0).item() == pytest.approx(4 + 1)


def small_cnn():
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(64, 10))


def test_batched_and_single_sample_calls_agree():
    torch.manual_seed(1)
    model = small_cnn().double().eval()
    x0 = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    init = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    kwargs = {"steps": 30, "lr": 0.05, "lambda_alpha": 1e-4, "lambda_tv": 1e-3, "bounds": (0.0, 1.0), "tol": 0}
    batched = inversion.invert(model, "2", x0=x0, init=init, **kwargs)
    for b in range(3):
        single = inversion.invert(model, "2", x0=x0[b:b + 1], init=init[b:b + 1], **kwargs)
        torch.testing.assert_close(single.x, batched.x[b:b + 1])
        torch.testing.assert_close(single.feature_error, batched.feature_error[b:b + 1])
    assert batched.x.min() >= 0 and batched.x.max() <= 1


def test_optimization_lowers_the_feature_error_with_priors_and_jitter():
    torch.manual_seed(2)
    model = small_cnn().eval()
    x0 = torch.rand(2, 1, 8, 8)
    start = inversion.invert(model, "0", x0=x0, steps=1, lr=1e-6, seed=3)
    result = inversion.invert(model, "0", x0=x0, steps=300, lr=0.05, lambda_tv=1e-3, jitter=1, bounds=(0, 1), seed=3)
    assert (result.feature_error < 0.75 * start.feature_error).all()
    assert (result.history[-1] < result.history[0]).all()


def test_target_only_needs_the_input_shape():
    model = small_cnn().eval()
    target = inversion.activations(model, "5", torch.rand(2, 1, 8, 8)).detach()
    with pytest.raises(ValueError, match="input_shape is needed"):
        inversion.invert(model, "5", target=target)
    result = inversion.invert(model, "5", target=target, input_shape=(1, 8, 8), steps=5)
    assert result.x.shape == (2, 1, 8, 8) and result.psnr is None and result.input_error is None


def test_unknown_layer_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"got 'conv9'; valid names: '0', '1', '2', '3', '4', '5'"):
        inversion.invert(small_cnn(), "conv9", x0=torch.rand(1, 1, 8, 8))
    with pytest.raises(ValueError, match="optimizer should be 'adam' or 'lbfgs', got 'sgd'"):
        inversion.invert(small_cnn(), "0", x0=torch.rand(1, 1, 8, 8), optimizer="sgd")


def mixed_mode_cnn():
    """A CNN with BatchNorm and Dropout in train mode, one submodule left in eval mode."""
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5),
                          nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(64, 10)).train()
    model[6].eval()
    return model


def record_modes(model):
    """Forward pre-hooks recording (BatchNorm.training, Dropout.training) at every call."""
    seen = []
    model[1].register_forward_pre_hook(lambda m, _: seen.append(("bn", m.training)))
    model[3].register_forward_pre_hook(lambda m, _: seen.append(("dropout", m.training)))
    return seen


def test_invert_leaves_parameter_grads_and_requires_grad_alone():
    model = small_cnn()
    model[0].weight.requires_grad_(False)
    for k, p in enumerate(model.parameters()):
        p.grad = torch.full_like(p, float(k + 1))
    grads = [(p.grad, p.grad.clone()) for p in model.parameters()]
    flags = [p.requires_grad for p in model.parameters()]
    x0 = torch.rand(2, 1, 8, 8)
    for optimizer in ("adam", "lbfgs"):
        inversion.invert(model, "2", x0=x0, steps=3, optimizer=optimizer, lr=0.05)
        for p, (grad, values) in zip(model.parameters(), grads):
            assert p.grad is grad
            torch.testing.assert_close(p.grad, values, rtol=0, atol=0)
        assert [p.requires_grad for p in model.parameters()] == flags


def test_invert_fit_decoder_and_evaluate_leave_modes_and_batchnorm_statistics_alone():
    model = mixed_mode_cnn()
    seen = record_modes(model)
    flags = [m.training for m in model.modules()]
    buffers = {name: (buf, buf.clone(), buf._version) for name, buf in model.named_buffers()}
    x0 = torch.rand(3, 1, 8, 8)

    def unchanged():
        assert [m.training for m in model.modules()] == flags
        for name, buf in model.named_buffers():
            original, values, version = buffers[name]
            assert buf is original and buf._version == version, name
            torch.testing.assert_close(buf, values, rtol=0, atol=0)

    inversion.invert(model, "4", x0=x0, steps=3)
    decoder = inversion.fit_decoder(model, "4", x0, epochs=1, hidden=4, seed=0)
    decoder.evaluate(x0)
    unchanged()
    assert seen and all(not training for _, training in seen)
    seen.clear()
    # Asked for, train mode runs BatchNorm on batch statistics and dropout, and still writes nothing.
    inversion.invert(model, "4", x0=x0, steps=3, train_mode=True)
    inversion.fit_decoder(model, "4", x0, epochs=1, hidden=4, seed=0, train_mode=True).evaluate(x0)
    unchanged()
    assert seen and all(training for _, training in seen)


def test_dropout_of_a_train_mode_model_is_off_during_inversion():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(6, 12), nn.Dropout(0.5)).double().train()
    x0 = torch.randn(4, 6, dtype=torch.float64)
    result = inversion.invert(model, "1", x0=x0, optimizer="lbfgs", lr=1.0, steps=200, tol=0, seed=0)
    assert result.input_error.max().item() < 1e-4 and result.feature_error.max().item() < 1e-6
    assert model.training and model[1].training


def bias_free_cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.ReLU(),
                         nn.Conv2d(4, 4, 3, stride=2, padding=1, bias=False), nn.ReLU()).eval()


def test_a_blank_image_does_not_stop_the_rest_of_the_batch():
    model = bias_free_cnn()
    x0 = torch.rand(3, 1, 8, 8)
    x0[1] = 0  # its activations are exactly zero
    init = 0.5 + 0.01 * torch.randn(3, 1, 8, 8)
    batched = inversion.invert(model, "2", x0=x0, init=init, steps=200, lr=0.05)
    for b in (0, 2):
        alone = inversion.invert(model, "2", x0=x0[b:b + 1], init=init[b:b + 1], steps=200, lr=0.05)
        assert batched.feature_error[b] < 0.05
        torch.testing.assert_close(batched.feature_error[b:b + 1], alone.feature_error)
        torch.testing.assert_close(batched.x[b:b + 1], alone.x)
        assert batched.iterations[b] == alone.iterations[0] == 200
    # The blank sample is matched in mean square: its activations end near zero.
    assert batched.feature_error[1] < 0.05
    assert torch.isfinite(batched.history).all()


@pytest.mark.parametrize(("jitter", "seed"), [(0, None), (1, 5)])
def test_adam_batched_equals_per_sample_with_per_sample_stops(jitter, seed):
    torch.manual_seed(1)
    model = small_cnn().double().eval()
    x0 = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    init = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    kwargs = {"steps": 150, "lr": 0.02, "lambda_tv": 1e-3, "tol": 1e-3, "jitter": jitter, "seed": seed}
    batched = inversion.invert(model, "2", x0=x0, init=init, **kwargs)
    for b in range(3):
        alone = inversion.invert(model, "2", x0=x0[b:b + 1], init=init[b:b + 1], **kwargs)
        torch.testing.assert_close(batched.x[b:b + 1], alone.x, rtol=1e-10, atol=0)
        torch.testing.assert_close(batched.feature_error[b:b + 1], alone.feature_error, rtol=1e-10, atol=0)
        assert batched.iterations[b] == alone.iterations[0]
        torch.testing.assert_close(batched.history[:alone.iterations[0], b:b + 1], alone.history, rtol=1e-10, atol=0)


def test_adam_iterations_are_counted_per_sample():
    torch.manual_seed(1)
    model = small_cnn().eval()
    x0 = torch.rand(3, 1, 8, 8)
    init = torch.rand(3, 1, 8, 8)
    init[0] = x0[0]  # already solved: its loss is 0 and does not change, so it stops after 2 iterations
    result = inversion.invert(model, "2", x0=x0, init=init, steps=40, tol=1e-6)
    assert torch.as_tensor(result.iterations).tolist() == [2, 40, 40]
    assert result.iterations.dtype == torch.int64
    assert result.history.shape == (40, 3)
    torch.testing.assert_close(result.x[0], x0[0], rtol=0, atol=0)


def test_zero_or_non_finite_targets_raise():
    model = small_cnn().eval()
    with pytest.raises(ValueError, match="invert: target is zero in every sample"):
        inversion.invert(model, "5", target=torch.zeros(2, 10), input_shape=(1, 8, 8), steps=2)
    target = torch.rand(2, 10)
    target[1, 3] = float("nan")
    with pytest.raises(ValueError, match=r"invert: target should be finite, got NaN or Inf in sample\(s\) \[1\]"):
        inversion.invert(model, "5", target=target, input_shape=(1, 8, 8), steps=2)


def test_target_must_have_the_exact_activation_shape():
    model = small_cnn().eval()
    x0 = torch.rand(3, 1, 8, 8)
    # Broadcastable to the [3, 4, 8, 8] activations of layer "0", but not their shape.
    with pytest.raises(ValueError, match=r"invert: target should have the shape of the output of layer '0' "
                                         r"for the input batch, \[3, 4, 8, 8\], got \[3, 1, 8, 8\]"):
        inversion.invert(model, "0", target=torch.rand(3, 1, 8, 8), x0=x0, steps=2)
    target = inversion.activations(model, "0", x0[:1]).detach()
    with pytest.raises(ValueError, match="invert: target, x0 and init should have the same batch size, "
                                         "got target 1, x0 3"):
        inversion.invert(model, "0", target=target, x0=x0, steps=2)


def test_fit_decoder_errors_name_fit_decoder():
    data = torch.rand(4, 1, 8, 8)
    with pytest.raises(ValueError, match=r"^fit_decoder: layer should be the name of a submodule"):
        inversion.fit_decoder(small_cnn(), "nope", data)

    class Early(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.unused = nn.Conv2d(1, 2, 3), nn.Conv2d(2, 2, 3)

        def forward(self, x):
            return self.used(x)

    with pytest.raises(ValueError, match=r"^fit_decoder: layer 'unused' did not run"):
        inversion.fit_decoder(Early(), "unused", data)


def test_half_infinite_bounds_give_a_finite_psnr():
    model = small_cnn().eval()
    x0 = torch.rand(2, 1, 8, 8)
    for bounds in ((0.0, math.inf), (-math.inf, 1.0)):
        result = inversion.invert(model, "2", x0=x0, steps=20, bounds=bounds, seed=0)
        assert torch.isfinite(result.x).all() and torch.isfinite(result.psnr).all()
        assert (result.x >= bounds[0]).all() and (result.x <= bounds[1]).all()
    for bad in ((0.0, math.nan), (1.0, 1.0)):
        with pytest.raises(ValueError, match="invert: bounds should be \\(low, high\\)"):
            inversion.invert(model, "2", x0=x0, steps=2, bounds=bad)


def residual_block(d=5, logdet="exact", lipschitz=0.9, **kwargs):
    torch.manual_seed(4)
    subnet = nn.Sequential(nn.Linear(d, 16), nn.ELU(), nn.Linear(16, d))
    return InvertibleResidual(subnet, lipschitz=lipschitz, logdet=logdet, **kwargs).double()


def test_residual_inverts_to_1e6_in_float64():
    block = residual_block().eval()
    x = torch.randn(8, 5, dtype=torch.float64)
    with torch.no_grad():
        y, _ = block(x)
        x_back = block.inverse(y, tol=1e-12)
    assert ((x_back - x).norm() / x.norm()).item() < 1e-6
    assert block.last_inverse["residual"] <= 1e-12 and block.last_inverse["iterations"] > 1


def test_residual_exact_logdet_is_slogdet_of_the_dense_jacobian():
    block = residual_block().eval()
    x = torch.randn(3, 5, dtype=torch.float64)
    _, logdet = block(x)
    for b in range(3):
        jac = torch.autograd.functional.jacobian(lambda v: block(v[None])[0][0], x[b])
        torch.testing.assert_close(logdet[b], torch.linalg.slogdet(jac).logabsdet)


def test_residual_series_estimator_is_unbiased_within_its_sampling_error():
    block = residual_block(logdet="series", terms=6, samples=1).eval()
    x = torch.randn(1, 5, dtype=torch.float64)
    g_jac = torch.autograd.functional.jacobian(lambda v: block.g(v[None])[0], x[0])
    truncated = sum((-1) ** (k + 1) / k * torch.trace(torch.linalg.matrix_power(g_jac, k)) for k in range(1, 7))
    torch.manual_seed(5)
    estimates = torch.stack([block(x)[1][0].detach() for _ in range(4000)])
    sem = estimates.std() / math.sqrt(len(estimates))
    assert abs(estimates.mean() - truncated).item() < 4 * sem.item()
    exact = block.exact_logdet(x)[0]
    assert abs(truncated - exact).item() < 5 * 0.9**7 / 7 / 0.1


def test_non_contractive_blocks_raise_clear_errors():
    with pytest.raises(ValueError, match=r"lipschitz should be in \(0, 1\) so that the block is invertible, got 1.5"):
        residual_block(lipschitz=1.5)

    class Amplify(nn.Module):
        def forward(self, x):
            return 50.0 * torch.sin(x)

    block = InvertibleResidual(nn.Sequential(nn.Linear(3, 3), Amplify()), lipschitz=0.9).double()
    with pytest.raises(RuntimeError, match="fixed-point inverse did not converge"):
        block.inverse(torch.randn(2, 3, dtype=torch.float64), max_iter=50)


def test_residual_composes_with_invertible_sequential():
    torch.manual_seed(6)
    blocks = [residual_block(d=4, logdet="exact") for _ in range(3)]
    model = InvertibleSequential(*blocks).double().eval()
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    grads = {}
    for memory_free in (True, False):
        model.memory_free = memory_free
        y, logdet = model(x)
        grads[memory_free] = torch.autograd.grad(y.square().sum() + logdet.sum(), [x, *model.parameters()])
    for a, b in zip(grads[True], grads[False]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9)
    with torch.no_grad():
        torch.testing.assert_close(model.inverse(model(x)[0]), x.detach())


@pytest.mark.parametrize("layer", ["0", "2"])
def test_decoder_beats_the_mean_image_on_held_out_digits(layer):
    from invkernels.demo import load_digits_split  # noqa: PLC0415

    torch.manual_seed(7)
    train, test = load_digits_split()
    model = small_cnn().eval()
    train = train[:600]
    result = inversion.fit_decoder(model, layer, train, epochs=20, hidden=32, seed=0)
    assert result.history[-1] < result.history[0]
    report = result.evaluate(test, bounds=(0.0, 1.0))
    mean_error = ((train.mean(0, keepdim=True) - test).flatten(1).norm(dim=1) / test.flatten(1).norm(dim=1))
    assert report.input_error.mean() < 0.9 * mean_error.mean()
    assert report.x.shape == test.shape and report.psnr.shape == (len(test),)


def test_fit_decoder_rejects_bad_arguments():
    with pytest.raises(ValueError, match="epochs should be a positive integer, got 0"):
        inversion.fit_decoder(small_cnn(), "0", torch.rand(4, 1, 8, 8), epochs=0)
    with pytest.raises(ValueError, match="valid names"):
        inversion.fit_decoder(small_cnn(), "nope", torch.rand(4, 1, 8, 8))


def test_invert_demo_runs_end_to_end_on_a_tiny_budget(tmp_path):
    from invkernels import invert_demo  # noqa: PLC0415

    cfg = invert_demo.InvertDemoConfig(classifier_epochs=1, steps=3, decoder_epochs=1, images=2, glow_epochs=1,
                                       out_dir=str(tmp_path))
    results = invert_demo.run(cfg, progress=False)
    assert [row["depth"] for row in results["table"]] == ["conv1", "conv1", "conv2", "conv2", "logits", "logits"]
    assert (tmp_path / "inversions.png").stat().st_size > 0 and (tmp_path / "results.json").exists()
    assert all(err < 1e-5 for err in results["exact"].values())
    assert "test accuracy" in invert_demo.report(results)


@pytest.mark.parametrize("optimizer", ["adam", "lbfgs"])
def test_a_start_where_the_gradient_is_exactly_zero_is_said(optimizer):
    """Every ReLU before the layer inactive at the default start: the gradient there is exactly
    zero, and the run would stop at its start without a word."""
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(4))
        model[0].bias.fill_(-10.0)
    x0 = torch.full((2, 4), 20.0)
    with pytest.warns(RuntimeWarning, match=r"invert: the gradient at the starting point is exactly zero for "
                                            r"samples \[0, 1\] .* layer '2'"):
        inversion.invert(model, "2", x0=x0, steps=3, optimizer=optimizer, seed=0)
