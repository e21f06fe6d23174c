"""The ActNorm module: data-dependent initialization in either direction, its state, eval mode."""

import pytest
import torch

from invkernels.nn import ActNorm
from tolerances import assert_close


@pytest.mark.parametrize("backend", ["cpp", pytest.param("triton", marks=pytest.mark.triton), "reference"])
def test_module_initializes_from_the_first_training_batch(backend):
    layer = ActNorm(5, backend=backend)
    x = 3.0 + 2.5 * torch.randn(16, 5, 6, 6)
    y, logdet = layer(x)
    dims = (0, 2, 3)
    assert_close(y.mean(dims), torch.zeros(5, dtype=torch.float64), atol=1e-5)
    assert_close(y.std(dims, unbiased=False), torch.ones(5, dtype=torch.float64), atol=1e-4)
    assert layer.initialized.item()
    bias = layer.bias.detach().clone()
    layer(x + 10.0)
    assert torch.equal(layer.bias.detach(), bias)
    assert_close(logdet, 36 * layer.log_scale.detach().double().sum().expand(16))
    assert_close(layer.inverse(y), x.double(), atol=1e-5)


def test_state_dict_round_trip_does_not_reinitialize():
    layer = ActNorm(3)
    layer(torch.randn(8, 3) * 4 + 1)
    state = layer.state_dict()
    assert state["initialized"].item()
    fresh = ActNorm(3)
    fresh.load_state_dict(state)
    x = torch.randn(8, 3) * 100
    y_fresh, _ = fresh(x)
    assert torch.equal(fresh.bias, layer.bias)
    assert_close(y_fresh, layer(x)[0].double())


def test_module_errors():
    with pytest.raises(ValueError, match="channels should be a positive integer, got 0"):
        ActNorm(0)
    with pytest.raises(ValueError, match="channels should be a positive integer, got True"):
        ActNorm(True)
    with pytest.raises(ValueError, match="data_init should be True or False, got 1"):
        ActNorm(3, data_init=1)
    layer = ActNorm(4)
    with pytest.raises(ValueError, match=r"x should have shape \[B, 4, ...\], got \[2, 3\]"):
        layer(torch.randn(2, 3))
    with pytest.raises(ValueError, match="at least 2 values per channel"):
        layer(torch.randn(1, 4))


def test_eval_mode_never_initializes():
    layer = ActNorm(4).eval()
    for call in (lambda: layer(torch.randn(2, 4)), lambda: layer.inverse(torch.randn(2, 4))):
        with pytest.raises(RuntimeError, match="not initialized, and this call is in eval mode"):
            call()
    assert not layer.is_initialized and not layer.initialized.item()
    layer.mark_initialized()
    x = torch.randn(2, 4)
    y, logdet = layer(x)
    assert torch.equal(y, x) and torch.equal(logdet, torch.zeros(2))


def test_without_data_init_the_layer_starts_as_the_identity():
    layer = ActNorm(3, data_init=False)
    assert layer.is_initialized
    x = 5 + torch.randn(4, 3)
    y, _ = layer(x)
    assert torch.equal(y, x) and torch.equal(layer.bias.detach(), torch.zeros(3))


def test_nan_or_inf_in_the_first_batch_is_an_error():
    layer = ActNorm(3)
    for bad in (float("nan"), float("inf")):
        x = torch.randn(4, 3, 2, 2)
        x[1, 2, 0, 1] = bad
        with pytest.raises(ValueError, match=r"NaN or Inf values in channel\(s\) \[2\]"):
            layer(x)
        assert not layer.is_initialized
        assert bool(torch.isfinite(layer.bias).all() and torch.isfinite(layer.log_scale).all())


def test_float64_statistics_for_a_large_mean_and_small_spread():
    layer = ActNorm(2).double()
    x = 1e4 + 1e-4 * torch.randn(64, 2, 4, 4, dtype=torch.float64)
    y, _ = layer(x)
    torch.testing.assert_close(y.std(dim=(0, 2, 3), unbiased=False), torch.ones(2, dtype=torch.float64),
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(y.mean(dim=(0, 2, 3)), torch.zeros(2, dtype=torch.float64), rtol=0, atol=1e-6)


def test_constant_channel_is_centred_not_scaled_with_a_warning():
    layer = ActNorm(3)
    x = torch.randn(8, 3, 4, 4)
    x[:, 1] = 7.0
    with pytest.warns(RuntimeWarning, match=r"channel\(s\) \[1\] have standard deviation <= eps"):
        y, _ = layer(x)
    assert layer.log_scale[1].item() == 0.0 and layer.bias[1].item() == -7.0
    assert torch.equal(y[:, 1], torch.zeros_like(y[:, 1]))
    assert abs(layer.log_scale[0].item()) < 1


def test_state_dict_without_the_flag_counts_as_initialized():
    trained = ActNorm(3)
    trained(torch.randn(16, 3) * 4 + 1)
    state = {k: v for k, v in trained.state_dict().items() if k != "initialized"}
    fresh = ActNorm(3)
    fresh.load_state_dict(state, strict=False)
    assert fresh.is_initialized
    fresh(torch.randn(16, 3) * 100)
    assert torch.equal(fresh.bias, trained.bias) and torch.equal(fresh.log_scale, trained.log_scale)


def test_first_call_in_the_inverse_direction_initializes_for_its_output():
    layer = ActNorm(3)
    z = 2 + 3 * torch.randn(32, 3, 4, 4, dtype=torch.float64)
    layer.double()
    x = layer.inverse(z)
    dims = (0, 2, 3)
    torch.testing.assert_close(x.mean(dims), torch.zeros(3, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(x.std(dims, unbiased=False), torch.ones(3, dtype=torch.float64), rtol=1e-12, atol=0)
    bias = layer.bias.detach().clone()
    z_back, _ = layer(x)
    assert torch.equal(layer.bias.detach(), bias)
    torch.testing.assert_close(z_back, z, rtol=1e-12, atol=1e-12)


def test_module_compiles_fullgraph():
    torch._dynamo.reset()
    layer = ActNorm(3).double()
    layer(torch.randn(8, 3, 4, 4, dtype=torch.float64))
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(4, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    y, logdet = compiled(x)
    y_ref, logdet_ref = layer(x)
    assert_close(y, y_ref)
    assert_close(logdet, logdet_ref)
    (gc,) = torch.autograd.grad(y.sum() + logdet.sum(), layer.log_scale)
    (ge,) = torch.autograd.grad(y_ref.sum() + logdet_ref.sum(), layer.log_scale)
    assert_close(gc, ge)


@pytest.mark.parametrize("flow", ["glow_step", "realnvp"])
def test_flow_first_used_latent_to_data_is_not_reset_by_a_later_forward(flow):
    from invkernels.models import RealNVP  # noqa: PLC0415
    from invkernels.nn import GlowStep  # noqa: PLC0415

    torch.manual_seed(3)
    if flow == "glow_step":
        model, z = GlowStep(4, hidden=8).double(), torch.randn(8, 4, 4, 4, dtype=torch.float64)
    else:
        model, z = RealNVP(4, blocks=2, hidden=8).double(), torch.randn(16, 4, dtype=torch.float64)
    with torch.no_grad():
        x = model.inverse(z)
        z_back, _ = model(x)
    torch.testing.assert_close(z_back, z, rtol=1e-10, atol=1e-10)
