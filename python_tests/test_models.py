"""Flow models (Glow, RealNVP), anomaly scores and the demo's pieces, on tiny models and few
steps. The command line: test_cli.py."""

import math

import pytest
import torch

from invkernels import anomaly
from invkernels.models import Glow, RealNVP
from invkernels.models.base import uniform_dequantize
from invkernels.nn import ActNorm


def tiny_glow(**kwargs):
    args = {"levels": 2, "steps": 2, "hidden": 8, "prior": "learned"}
    args.update(kwargs)
    return Glow((1, 8, 8), **args)


def digits_like(n=16, levels=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, levels, (n, 1, 8, 8), generator=g).float() / (levels - 1)


def randomize(model, scale=0.05):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    for m in model.modules():
        if isinstance(m, ActNorm):
            m.mark_initialized()


def grid_density(model, half_width=10.0, n=1001):
    grid = torch.linspace(-half_width, half_width, n, dtype=torch.float64)
    xs, ys = torch.meshgrid(grid, grid, indexing="ij")
    points = torch.stack([xs.flatten(), ys.flatten()], 1)
    with torch.no_grad():
        log_p = torch.cat([model.log_prob(chunk) for chunk in torch.split(points, 50000)])
    normal = -0.5 * points.square().sum(1) - math.log(2 * math.pi)
    return log_p.exp().view(n, n), (grid[1] - grid[0]).item(), (log_p - normal).abs().max().item()


@pytest.mark.parametrize("kwargs", [{"blocks": 4, "hidden": 16},
                                    {"blocks": 3, "hidden": 16, "mixing": "reverse", "scale": "sigmoid"}])
def test_realnvp_log_prob_integrates_to_one(kwargs):
    torch.manual_seed(0)
    model = RealNVP(2, **kwargs).double()
    randomize(model, 0.1)
    model.eval()
    density, step, distance_from_normal = grid_density(model)
    assert distance_from_normal > 0.1  # not the standard normal it started as
    assert abs(density.sum().item() * step**2 - 1.0) < 1e-4
    marginal = density.sum(1) * step  # the 1-D marginal of the first coordinate
    assert abs(marginal.sum().item() * step - 1.0) < 1e-4


@pytest.mark.parametrize("model_fn", [lambda: tiny_glow(prior="gaussian").double(),
                                      lambda: tiny_glow(prior="gaussian", coupling="spline", bins=3).double(),
                                      lambda: RealNVP(6, blocks=3, hidden=16).double()])
def test_log_prob_is_the_change_of_variables_of_the_dense_jacobian(model_fn):
    """log p(x) = log N(z; 0, I) + log|det dz/dx| with z all the latents (the factored-out halves
    under the Gaussian prior included), the Jacobian taken densely by autograd; and sampling then
    inverting round-trips."""
    torch.manual_seed(2)
    model = model_fn()
    randomize(model)
    model.eval()
    torch.manual_seed(3)
    x = model.sample(3)
    assert x.shape == (3, *model.event_shape)
    for b in range(x.shape[0]):
        xb = x[b:b + 1]
        jac = torch.autograd.functional.jacobian(lambda v: model(v.view_as(xb))[0].flatten(), xb.flatten())
        z = model(xb)[0].flatten()
        expected = -0.5 * (z.square() + math.log(2 * math.pi)).sum() + torch.linalg.slogdet(jac).logabsdet
        torch.testing.assert_close(model.log_prob(xb)[0], expected, rtol=1e-10, atol=1e-10)
    z, _ = model(x)
    torch.testing.assert_close(model.inverse(z), x)
    assert model.sample(3, temperature=0.0).shape[0] == 3


def test_glow_round_trip_and_shapes():
    torch.manual_seed(4)
    model = tiny_glow(levels=3, steps=1).double()
    randomize(model)
    model.eval()
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    z, logdet = model(x)
    assert z.shape == (3, 64) and logdet.shape == (3,)
    torch.testing.assert_close(model.inverse(z), x)


@pytest.mark.parametrize("coupling", ["affine", "spline"])
def test_glow_loss_decreases_on_digits(coupling):
    from invkernels.demo import load_digits_split  # noqa: PLC0415

    torch.manual_seed(5)
    train, _ = load_digits_split()
    model = tiny_glow(steps=2, hidden=16, coupling=coupling)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    batch = train[:128]
    losses = []
    for _ in range(25):
        loss = model.bits_per_dim(batch, 17).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.2, losses


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(6)
    model = tiny_glow()
    model(digits_like())
    model.eval()
    path = tmp_path / "glow.pt"
    torch.save(model.state_dict(), path)
    fresh = tiny_glow()
    fresh.load_state_dict(torch.load(path, weights_only=True))
    fresh.eval()
    x = torch.rand(4, 1, 8, 8)
    torch.testing.assert_close(fresh.log_prob(x), model.log_prob(x), rtol=0, atol=0)


def test_bits_per_dim_matches_log_prob_with_the_dequantization_correction():
    torch.manual_seed(7)
    model = tiny_glow().double()
    randomize(model)
    model.eval()
    x = digits_like().double()
    torch.manual_seed(8)
    bpd = model.bits_per_dim(x, 17)
    torch.manual_seed(8)
    y = model.dequantize(x, 17)
    assert ((y >= 0) & (y < 1)).all()
    expected = -(model.log_prob(y) - 64 * math.log(17)) / (64 * math.log(2))
    torch.testing.assert_close(bpd, expected)


def test_bad_inputs_give_clear_errors():
    model = tiny_glow()
    with pytest.raises(ValueError, match=r"x should have shape \[B, 1, 8, 8\], got \[2, 1, 8, 7\]"):
        model(torch.rand(2, 1, 8, 7))
    with pytest.raises(ValueError, match=r"x should hold values in \[0, 1\].*got values in \[-0.5"):
        model.bits_per_dim(torch.full((2, 1, 8, 8), -0.5), 17)
    with pytest.raises(ValueError, match="x should lie on the grid of 17 levels"):
        model.bits_per_dim(torch.full((2, 1, 8, 8), 0.03), 17)
    with pytest.raises(ValueError, match="levels should be an integer >= 2, got 1"):
        model.bits_per_dim(digits_like(), 1)
    with pytest.raises(ValueError, match="H and W should be divisible by 2 \\*\\* levels = 8"):
        Glow((1, 12, 12), levels=3)
    with pytest.raises(ValueError, match="Glow: coupling should be 'affine', 'additive' or 'spline', got 'nice'"):
        Glow((1, 8, 8), coupling="nice")
    with pytest.raises(ValueError, match="Glow: tail_bound should be"):
        Glow((1, 8, 8), coupling="spline", tail_bound=-1.0)
    with pytest.raises(ValueError, match="temperature should be a finite number >= 0, got -1"):
        model.sample(2, temperature=-1)
    with pytest.raises(ValueError, match=r"z should have shape \[B, 64\]"):
        model.inverse(torch.zeros(2, 63))
    with pytest.raises(ValueError, match="mixing should be 'invconv', 'reverse' or 'random', got 'shuffle'"):
        RealNVP(4, mixing="shuffle")
    with pytest.raises(ValueError, match="features should be >= 2"):
        RealNVP(1)


def test_anomaly_scores_and_auroc():
    torch.manual_seed(9)
    model = RealNVP(2, blocks=2, hidden=8).double()
    randomize(model)
    model.eval()
    inliers = torch.randn(200, 2, dtype=torch.float64)
    outliers = 6 + torch.randn(200, 2, dtype=torch.float64)
    s_in, s_out = anomaly.score(model, inliers, batch_size=64), anomaly.score(model, outliers)
    torch.testing.assert_close(s_in, -model.log_prob(inliers))
    assert anomaly.auroc(s_in, s_out) > 0.99
    assert abs(anomaly.auroc(s_in[:100], s_in[100:]) - 0.5) < 0.15
    with pytest.raises(ValueError, match="batch_size should be a positive integer, got 0"):
        anomaly.score(model, inliers, batch_size=0)


def test_gaussian_baseline_and_ood_sets():
    from invkernels import demo  # noqa: PLC0415

    train, test = demo.load_digits_split()
    assert train.shape == (1437, 1, 8, 8) and test.shape == (360, 1, 8, 8)
    torch.manual_seed(10)
    bpd = demo.gaussian_baseline_bits_per_dim(train, test)
    assert 0 < bpd < math.log2(17)
    sets = demo.out_of_distribution(test[:20])
    for name, data in sets.items():
        assert data.shape == (20, 1, 8, 8), name
        k = data * 16
        assert torch.equal(k, k.round()) and data.min() >= 0 and data.max() <= 1


def test_score_refuses_an_untrained_model_instead_of_initializing_it():
    torch.manual_seed(11)
    model = RealNVP(2, blocks=2, hidden=8).double()  # ActNorm never initialized, in training mode
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"score: the model's ActNorm layers are not initialized \(flow\.\S*0, flow\.\S*3\)"):
        anomaly.score(model, torch.randn(8, 2, dtype=torch.float64))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not any(m.is_initialized for m in model.modules() if isinstance(m, ActNorm))


def test_score_evaluates_in_eval_mode_and_restores_the_modes():
    torch.manual_seed(12)
    model = RealNVP(2, blocks=2, hidden=8).double()
    randomize(model)
    model.train()
    model.flow[2].eval()  # a submodule with its own flag, restored as it was
    seen = []
    model.flow.register_forward_pre_hook(lambda module, args: seen.append(module.training))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(10, 2, dtype=torch.float64)
    scores = anomaly.score(model, x, batch_size=4)
    assert seen == [False, False, False]
    assert model.training and model.flow.training and not model.flow[2].training and model.flow[1].training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(scores, -model.log_prob(x))


def test_score_of_a_scalar_or_a_non_tensor_says_what_it_got():
    model = RealNVP(2, blocks=1, hidden=8)
    randomize(model)
    with pytest.raises(ValueError, match=r"score: x should be a batch \[N, \.\.\.\] of inputs, got a 0-D tensor \(1\.0\)"):
        anomaly.score(model, torch.tensor(1.0))
    with pytest.raises(TypeError, match=r"score: x should be a tensor \[N, \.\.\.\], got list"):
        anomaly.score(model, [[0.0, 1.0]])


def test_auroc_ranks_infinite_scores_as_the_most_and_least_anomalous():
    inliers = torch.tensor([0.5, 1.0, 2.0, -math.inf])
    outliers = torch.tensor([1.5, math.inf, math.inf, 3.0])
    # Only the order counts: the same AUROC as with the infinities replaced by extreme finite values.
    expected = anomaly.auroc(torch.tensor([0.5, 1.0, 2.0, -1e300]), torch.tensor([1.5, 1e300, 1e300, 3.0]))
    assert anomaly.auroc(inliers, outliers) == expected == 15 / 16
    assert anomaly.auroc(torch.tensor([1.0, 2.0]), torch.tensor([math.inf])) == 1.0
    assert anomaly.auroc(torch.tensor([math.inf, 1.0]), torch.tensor([math.inf, 0.0])) == 0.375


@pytest.mark.parametrize("where", ["inlier_scores", "outlier_scores"])
def test_auroc_of_nan_scores_names_the_argument(where):
    scores = {"inlier_scores": torch.tensor([0.1, 0.2, 0.3]), "outlier_scores": torch.tensor([1.0, 2.0])}
    scores[where] = torch.cat([scores[where], torch.tensor([math.nan])])
    with pytest.raises(ValueError, match=f"auroc: {where} has 1 NaN score"):
        anomaly.auroc(**scores)


@pytest.mark.parametrize("model_fn,x", [(tiny_glow, torch.rand(2, 1, 8, 8, dtype=torch.float64)),
                                        (lambda: RealNVP(3, blocks=1, hidden=8), torch.rand(2, 3).half())])
def test_an_input_of_another_dtype_than_the_model_names_both(model_fn, x):
    torch.manual_seed(13)
    model = model_fn()
    randomize(model)
    model.eval()
    name = type(model).__name__
    with pytest.raises(ValueError, match=rf"{name}: x has dtype {x.dtype} but the model's parameters are "
                                         rf"torch.float32: pass x.to\(torch.float32\), or convert the model"):
        model.log_prob(x)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # autocast decides the dtypes itself
        assert model(x.bfloat16())[1].dtype == torch.float32


@pytest.mark.parametrize("dtype,levels", [(torch.bfloat16, 50), (torch.bfloat16, 256), (torch.float16, 50),
                                          (torch.float16, 256), (torch.float16, 1000)])
def test_bits_per_dim_takes_valid_data_stored_in_half_precision(dtype, levels):
    torch.manual_seed(14)
    model = tiny_glow(steps=1)
    randomize(model)
    model = model.to(dtype).eval()
    k = torch.arange(levels).repeat(64 * math.ceil(levels / 64))[:64 * math.ceil(levels / 64)]
    exact = (k.double() / (levels - 1)).view(-1, 1, 8, 8)
    x = exact.to(dtype)  # every level k / (levels - 1), rounded to dtype
    torch.manual_seed(15)
    y = model.dequantize(x, levels)
    torch.manual_seed(15)
    # The same dequantization as of the exact data in float32: k recovered, k + u not rounded in dtype.
    assert torch.equal(y, uniform_dequantize(exact.float(), levels).to(dtype))
    with torch.no_grad():
        bpd = model.bits_per_dim(x, levels)
    assert bpd.dtype == torch.float32 and bool(torch.isfinite(bpd).all())


def test_bits_per_dim_in_half_precision_rejects_what_the_dtype_cannot_hold():
    model = tiny_glow(steps=1)
    randomize(model)
    model = model.bfloat16().eval()
    with pytest.raises(ValueError, match=r"x in torch.bfloat16 cannot hold 1000 distinct levels in \[0, 1\] "
                                         r"\(at most 256"):
        model.bits_per_dim(torch.full((2, 1, 8, 8), 0.7, dtype=torch.bfloat16), 1000)
    with pytest.raises(ValueError, match="x should lie on the grid of 17 levels k / 16; the value 0.0300293 is 0.48"):
        model.bits_per_dim(torch.full((2, 1, 8, 8), 0.03, dtype=torch.bfloat16), 17)
    with pytest.raises(ValueError, match=r"x in torch.float16 cannot hold 4096 distinct levels in \[0, 1\] "
                                         r"\(at most 2048"):
        model.half().bits_per_dim(torch.full((2, 1, 8, 8), 0.7, dtype=torch.float16), 4096)
