"""The Triton twins of the C++ ops (coupling, ActNorm, LU 1x1 convolution) are derived from the
C++ ops: the same schema but the name, the same fake implementation, the same argument checks
(invkernels/ops/_registry.py); each launches Triton kernels of its own, never a C++ op."""

import warnings

import pytest
import torch

from invkernels.ops import _registry
from invkernels.ops import actnorm as A
from invkernels.ops import coupling as C
from optest import as_tuple, coupling_case, op_names, valid_args
from tolerances import assert_close

pytestmark = pytest.mark.triton

NS = torch.ops.invkernels


@pytest.fixture(scope="module", autouse=True)
def _registered():
    for family in _registry.FAMILIES.values():
        family.cpp()
        family.triton()


def cpp_op_names():
    """Every op the compiled extension registers (csrc/invkernels.cpp)."""
    names = (n for n in dir(NS) if isinstance(getattr(NS, n, None), torch._ops.OpOverloadPacket))
    return sorted(n for n in names if not n.endswith("_triton"))


def test_every_cpp_op_has_a_twin_with_its_schema():
    cpp_names = cpp_op_names()
    assert cpp_names == sorted(op_names())
    for name in cpp_names:
        cpp_schema = str(getattr(NS, name).default._schema)
        twin_schema = str(getattr(NS, name + "_triton").default._schema)
        assert twin_schema == cpp_schema.replace(f"invkernels::{name}(", f"invkernels::{name}_triton(", 1)


def test_additive_coupling_bwd_takes_no_h():
    args = [(a.name, str(a.type)) for a in NS.additive_coupling_bwd.default._schema.arguments]
    assert args == [("grad_out", "Tensor"), ("reverse", "bool"), ("passthrough", "Optional[int]")]


def test_a_family_without_a_launcher_for_an_op_is_refused():
    defs = {"actnorm_fwd": A._FAMILY.defs["actnorm_fwd"]}
    with pytest.raises(ValueError, match=r"no Triton launcher for the ops \['actnorm_fwd'\]"):
        _registry.register_triton_twins(defs, {"actnorm_fwd": A._FAMILY.fakes["actnorm_fwd"]}, {})


def test_twins_compile_fullgraph_with_gradients():
    """custom_op + register_fake around the launch traces under torch.compile (DESIGN.md)."""
    torch._dynamo.reset()
    ops, an = C.triton_ops(), A.triton_ops()

    def step(x, h, ha, b, ls):
        y, logdet = an.fwd(x, b, ls)
        y, logdet2 = ops.affine_fwd(y, h, "exp", 2.0)
        y = ops.additive_inv(y, ha)
        return y, logdet + logdet2

    x, h, ha, _ = coupling_case(spatial=(2, 2))
    inputs = [t.double() for t in (x, h, ha, torch.randn(5), 0.3 * torch.randn(5))]
    eager_in = [t.clone().requires_grad_() for t in inputs]
    comp_in = [t.clone().requires_grad_() for t in inputs]
    y, logdet = step(*eager_in)
    yc, logdetc = torch.compile(step, fullgraph=True, backend="aot_eager")(*comp_in)
    assert_close(yc, y)
    assert_close(logdetc, logdet)
    eager_grads = torch.autograd.grad(y.square().sum() + logdet.sum(), eager_in)
    comp_grads = torch.autograd.grad(yc.square().sum() + logdetc.sum(), comp_in)
    for got, want in zip(comp_grads, eager_grads):
        assert_close(got, want)


@pytest.fixture
def cpp_kernels_raise():
    """Every C++ op's CPU kernel replaced by one that raises, for the test's duration."""
    lib = torch.library.Library("invkernels", "IMPL")

    def raising(*args, **kwargs):
        raise AssertionError("a C++ op ran")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in cpp_op_names():
            lib.impl(name, raising, "CPU", allow_override=True)
    yield
    lib._destroy()


@pytest.mark.parametrize("name", op_names())
def test_the_patch_makes_every_cpp_op_raise(name, cpp_kernels_raise):
    with pytest.raises(AssertionError, match=r"a C\+\+ op ran"):
        getattr(NS, name)(*valid_args(name))


@pytest.mark.parametrize("name", op_names())
def test_every_twin_runs_with_the_cpp_ops_raising(name, cpp_kernels_raise):
    args = valid_args(name)
    for out in as_tuple(getattr(NS, name + "_triton")(*args)):
        assert torch.isfinite(out).all()


def test_a_glow_step_trains_on_the_triton_backend_with_the_cpp_ops_raising(cpp_kernels_raise):
    """Plain autograd and the memory-free backward (the fused inverse-backward ops) of Glow steps."""
    from invkernels.nn import GlowStep, InvertibleSequential  # noqa: PLC0415

    for memory_free in (False, True):
        chain = InvertibleSequential(*(GlowStep(4, hidden=8, backend="triton") for _ in range(2)),
                                     memory_free=memory_free).double()
        x = torch.randn(3, 4, 2, 2, dtype=torch.float64, requires_grad=True)
        y, logdet = chain(x)
        (y.square().sum() + logdet.sum()).backward()
        grads = [x.grad] + [p.grad for p in chain.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("spatial", [(1,), (2,), (20,), (300,)])
def test_the_gpu_tiles_give_the_cpp_results_under_the_interpreter(spatial, monkeypatch):
    """The coupling and ActNorm launchers with their GPU tile choice (every tile of their
    ``gpu_configs()`` for these sizes, several tiles per sample for S = 300)."""
    from invkernels.triton import actnorm as actnorm_triton  # noqa: PLC0415
    from invkernels.triton import coupling as coupling_triton  # noqa: PLC0415

    monkeypatch.setattr(coupling_triton, "interpreting", lambda: False)
    monkeypatch.setattr(actnorm_triton, "interpreting", lambda: False)
    for name in C._FAMILY.names + A._FAMILY.names:
        args = valid_args(name, spatial)
        for got, want in zip(as_tuple(getattr(NS, name + "_triton")(*args)), as_tuple(getattr(NS, name)(*args))):
            assert_close(got, want.double(), reduce_len=15 * spatial[0])
