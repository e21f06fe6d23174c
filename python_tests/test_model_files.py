"""Models saved with their constructor arguments (``FlowModel.save``) and loaded from the file
alone (``Glow.load(path)``, ``FlowModel.load(path)``), with ``torch.load(weights_only=True)``."""

import pytest
import torch

from invkernels.models import FlowModel, Glow, NeuralSplineFlow, RealNVP

BUILDERS = {
    "glow": (lambda: Glow([1, 4, 4], levels=2, steps=2, hidden=4, prior="learned", coupling="additive"),
             lambda: torch.rand(6, 1, 4, 4), None),
    "realnvp": (lambda: RealNVP(3, blocks=2, hidden=6, mixing="random", memory_free=False),
                lambda: torch.randn(6, 3), None),
    "spline": (lambda: NeuralSplineFlow(2, blocks=2, hidden=6, bins=4, context_features=3),
               lambda: torch.randn(6, 2), lambda: torch.randn(6, 3)),
}


def trained(name):
    build, data, context = BUILDERS[name]
    torch.manual_seed(4)
    model = build()
    x = data()
    kwargs = {} if context is None else {"context": context()}
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    for _ in range(2):
        loss = -model.log_prob(x, **kwargs).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), x, kwargs


@pytest.mark.parametrize("name", list(BUILDERS))
def test_a_saved_model_loads_from_its_file_with_identical_log_prob(name, tmp_path):
    model, x, kwargs = trained(name)
    path = tmp_path / "model.pt"
    model.save(path, metadata={"epochs": 2, "note": "test"})
    for loader in (type(model), FlowModel):
        loaded = loader.load(path)
        assert type(loaded) is type(model) and not loaded.training
        assert loaded.saved_metadata == {"epochs": 2, "note": "test"}
        with torch.no_grad():
            assert torch.equal(loaded.log_prob(x, **kwargs), model.log_prob(x, **kwargs))
        assert loaded.state_dict().keys() == model.state_dict().keys()
    saved = torch.load(path, weights_only=True)
    assert saved["class"] == type(model).__name__ and "state_dict" in saved


def test_loading_checks_the_file_and_the_class(tmp_path):
    model, _, _ = trained("realnvp")
    path = tmp_path / "realnvp.pt"
    model.save(path)
    assert torch.load(path, weights_only=True)["arguments"]["features"] == 3
    with pytest.raises(ValueError, match=r"Glow.load: .* holds a RealNVP, not a Glow; use RealNVP.load"):
        Glow.load(path)
    bare = tmp_path / "bare.pt"
    torch.save(model.state_dict(), bare)
    with pytest.raises(ValueError, match="is not a model saved by FlowModel.save .* model.load_state_dict"):
        RealNVP.load(bare)
