"""GlowStep: the folded ActNorm + 1x1 convolution against the three layers applied in turn."""

import pytest
import torch

import invkernels
from invkernels.nn import GlowStep
from tolerances import assert_close


def randomized(step):
    with torch.no_grad():
        for p in step.coupling.parameters():
            p.copy_(0.2 * torch.randn_like(p))
        step.actnorm.bias.copy_(torch.randn_like(step.actnorm.bias))
        step.actnorm.log_scale.copy_(0.3 * torch.randn_like(step.actnorm.log_scale))
    step.actnorm.mark_initialized()
    return step


def unfused(step, x):
    y, ld1 = step.actnorm(x)
    y, ld2 = step.invconv(y)
    y, ld3 = step.coupling(y)
    return y, ld1 + ld2 + ld3


@pytest.mark.parametrize("coupling,scale", [("affine", "sigmoid"), ("affine", "exp"), ("additive", "sigmoid"),
                                            ("spline", "sigmoid")])
@pytest.mark.parametrize("lu", [True, False])
def test_folded_step_equals_the_three_layers(coupling, scale, lu):
    step = randomized(GlowStep(6, hidden=8, scale=scale, lu=lu, coupling=coupling, bins=4)).double()
    x = torch.randn(3, 6, 4, 4, dtype=torch.float64, requires_grad=True)
    y, logdet = step(x)
    y_ref, logdet_ref = unfused(step, x)
    assert_close(y, y_ref)
    assert_close(logdet, logdet_ref)
    params = [x, *step.parameters()]
    grads = torch.autograd.grad(y.square().sum() + logdet.sum(), params)
    expected = torch.autograd.grad(y_ref.square().sum() + logdet_ref.sum(), params)
    for got, want in zip(grads, expected):
        assert_close(got, want)
    x_back, logdet_inv = step.inverse(y.detach(), return_logdet=True)
    assert_close(x_back, x.detach())
    assert_close(logdet_inv, -logdet.detach())


@pytest.mark.parametrize("coupling", ["affine", "additive", "spline"])
def test_logdet_is_slogdet_of_dense_jacobian(coupling):
    step = randomized(GlowStep(4, hidden=8, coupling=coupling, bins=3, tail_bound=1.5)).double()
    x = torch.randn(1, 4, 2, 2, dtype=torch.float64)
    _, logdet = step(x)
    jac = torch.autograd.functional.jacobian(lambda v: step(v.reshape(1, 4, 2, 2))[0].reshape(-1), x.reshape(-1))
    sign, expected = torch.linalg.slogdet(jac)
    assert sign.item() != 0
    assert_close(logdet[0], expected)


def test_first_training_batch_initializes_actnorm():
    step = GlowStep(4, hidden=8)
    x = 2.0 + 3.0 * torch.randn(32, 4, 5, 5)
    step(x)
    assert step.actnorm.initialized.item()
    normalized, _ = step.actnorm(x)
    assert_close(normalized.mean((0, 2, 3)), torch.zeros(4, dtype=torch.float64), atol=1e-5)
    assert_close(normalized.std((0, 2, 3), unbiased=False), torch.ones(4, dtype=torch.float64), atol=1e-4)


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_vectors_and_backends(backend):
    torch.manual_seed(1)
    step = randomized(GlowStep(5, subnet="mlp", backend=backend)).double()
    x = torch.randn(7, 5, dtype=torch.float64)
    y, logdet = step(x)
    y_ref, logdet_ref = unfused(step, x)
    assert_close(y, y_ref)
    assert_close(logdet, logdet_ref)
    assert_close(step.inverse(y), x)


@pytest.mark.parametrize("coupling", ["additive", "spline"])
def test_step_memory_free_gradients_equal_stored_ones(coupling):
    """A chain of spline or additive Glow steps: the fused inverse-backward path (the coupling's
    ``rq_spline_inv_bwd`` or ``additive_coupling_inv_bwd``, then the front's VJP) gives the stored
    chain's gradients."""
    from invkernels.nn import InvertibleSequential  # noqa: PLC0415

    torch.manual_seed(7)
    chain = InvertibleSequential(*(randomized(GlowStep(4, hidden=8, coupling=coupling, bins=4)) for _ in range(2)))
    chain = chain.double()
    x = torch.randn(3, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    grads = {}
    for memory_free in (True, False):
        chain.memory_free = memory_free
        y, logdet = chain(x)
        loss = y.sin().sum() + logdet.square().sum()
        grads[memory_free] = torch.autograd.grad(loss, [x, *chain.parameters()])
    for got, want in zip(grads[True], grads[False]):
        assert_close(got, want)


def test_compiles_fullgraph():
    torch._dynamo.reset()
    step = randomized(GlowStep(4, hidden=8)).double()
    x = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    compiled = torch.compile(step, fullgraph=True)
    y, logdet = compiled(x)
    y_ref, logdet_ref = step(x)
    assert_close(y, y_ref)
    assert_close(logdet, logdet_ref)


def test_bad_arguments():
    with pytest.raises(ValueError, match="scale should be one of 'exp', 'sigmoid', 'sigmoid_eps', 'atan', "
                                         "'rational', got 'relu'"):
        GlowStep(4, scale="relu")
    with pytest.raises(ValueError, match=r"x should have shape \[B, 4, ...\], got \[2, 3, 4, 4\]"):
        GlowStep(4, hidden=8)(torch.randn(2, 3, 4, 4))
    with pytest.raises(ValueError, match="backend should be one of"):
        GlowStep(4, backend="fast")
    with pytest.raises(ValueError, match="GlowStep: coupling should be 'affine', 'additive' or 'spline', got 'rq'"):
        GlowStep(4, coupling="rq")
    with pytest.raises(ValueError, match="RQSplineCoupling: bins should be"):
        GlowStep(4, coupling="spline", bins=0)
    assert invkernels.get_backend() == "cpp"


@pytest.mark.parametrize("backend", ["cpp", pytest.param("triton", marks=pytest.mark.triton), "reference"])
@pytest.mark.parametrize("shape", [(3, 5, 2, 3), (4, 6)])
def test_the_ops_front_is_actnorm_then_the_conv_with_actnorms_logdet(backend, shape):
    """``ops.actnorm_conv1x1`` and its VJP against ActNorm's reference followed by the product, by
    float64 autograd (the log-det's gradient reaches log_scale)."""
    from invkernels import reference as R  # noqa: PLC0415

    c = shape[1]
    x = torch.randn(shape, dtype=torch.float64)
    w = torch.randn(c, c, dtype=torch.float64) / c**0.5
    bias, log_scale = 0.5 * torch.randn(c, dtype=torch.float64), 0.3 * torch.randn(c, dtype=torch.float64)
    gy, gl = torch.randn(shape, dtype=torch.float64), torch.randn(shape[0], dtype=torch.float64)
    y, logdet = invkernels.ops.actnorm_conv1x1(x, w, bias, log_scale, backend=backend)
    inputs = [t.clone().requires_grad_() for t in (x, w, bias, log_scale)]
    u, want_logdet = R.actnorm_fwd(inputs[0], inputs[2], inputs[3])
    want_y = R.conv1x1(u, inputs[1])
    assert_close(y, want_y)
    assert_close(logdet, want_logdet)
    want = torch.autograd.grad((want_y * gy).sum() + (want_logdet * gl).sum(), inputs)
    got = invkernels.ops.actnorm_conv1x1_vjp(gy, gl, x, w, bias, log_scale, backend=backend)
    for g, e in zip(got, want):
        assert_close(g, e)
    autograd = torch.autograd.grad(
        [(t * g).sum() for t, g in zip(invkernels.ops.actnorm_conv1x1(*inputs, backend=backend), (gy, gl))], inputs)
    for g, e in zip(autograd, want):
        assert_close(g, e)
