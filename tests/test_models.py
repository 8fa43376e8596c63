import contextlib
import pickle

import pytest
import torch
from torch import nn

from elgs.engine import Engine, Request
from elgs.images import image_to_tensor, sample_photo
from elgs.models import MODELS, ModelSpec, WeightsUnavailableError, get_model_spec, load_model

CAT_CLASSES = {"Egyptian cat", "tabby", "tiger cat"}


@pytest.fixture
def register_model():
    """Register specs for one test only (the zoo is a :class:`~elgs.registry.Registry`)."""
    with contextlib.ExitStack() as stack:
        yield lambda spec: stack.enter_context(MODELS.temporarily(spec))


def test_zoo_entries_carry_their_config():
    assert set(MODELS) >= {"vgg16", "inception_v3", "efficientnet_lite0"}
    assert get_model_spec("vgg16").default_lambda == 3.5 and get_model_spec("vgg16").input_size == 224
    assert get_model_spec("inception_v3").default_lambda == 2.3 and get_model_spec("inception_v3").input_size == 299
    assert get_model_spec("efficientnet_lite0").mean == (0.5, 0.5, 0.5)
    with pytest.raises(KeyError, match="choose one of"):
        get_model_spec("resnet9000")


def test_offline_refusal_names_file_and_three_ways(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("ELGS_WEIGHTS_DIR", raising=False)
    with pytest.raises(WeightsUnavailableError) as error:
        load_model("vgg16", allow_download=False)
    message = str(error.value)
    assert "vgg16-397923af.pth" in message and "ELGS_WEIGHTS_DIR" in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints") in message and "elgs models fetch vgg16" in message


def test_local_weights_file_loaded_with_weights_only(tmp_path, monkeypatch, register_model):
    torch.manual_seed(0)
    reference = nn.Linear(4, 3)
    torch.save(reference.state_dict(), tmp_path / "tiny-weights.pth")
    spec = ModelSpec(name="tiny_linear", summary="test", input_size=32, mean=(0.5,) * 3, std=(0.5,) * 3,
                     default_lambda=1.0, weights_source="test", weights_file="tiny-weights.pth",
                     build=lambda state: _linear_with(state))
    register_model(spec)
    loaded = load_model("tiny_linear", device="cpu", weights_dir=tmp_path)
    torch.testing.assert_close(loaded.module.weight, reference.weight)
    assert loaded.weights == "pretrained" and not loaded.module.weight.requires_grad and not loaded.module.training
    # The registry reads no ELGS_* variable: Settings does, and the CLI and the app pass its values on.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("ELGS_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(WeightsUnavailableError):
        load_model("tiny_linear", device="cpu", allow_download=False)
    from elgs.cli._common import zoo_options

    monkeypatch.setenv("ELGS_ALLOW_DOWNLOAD", "0")
    monkeypatch.setenv("ELGS_DEVICE", "cpu")
    assert zoo_options() == {"device": "cpu", "weights_dir": tmp_path, "allow_download": False}
    assert zoo_options("meta")["device"] == "meta"


def _linear_with(state):
    layer = nn.Linear(4, 3)
    if state is not None:
        layer.load_state_dict(state)
    return layer


def test_pickled_objects_are_refused(tmp_path, monkeypatch, register_model):
    class Evil:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"weight": Evil()}, tmp_path / "tiny-weights.pth")
    spec = ModelSpec(name="tiny_evil", summary="test", input_size=32, mean=(0.5,) * 3, std=(0.5,) * 3,
                     default_lambda=1.0, weights_source="test", weights_file="tiny-weights.pth", build=_linear_with)
    register_model(spec)
    with pytest.raises(pickle.UnpicklingError, match="[Ww]eights only load failed|Unsupported global"):
        load_model("tiny_evil", device="cpu", weights_dir=tmp_path)


@pytest.mark.parametrize("name,size", [("vgg16", 64), ("inception_v3", 96)])
def test_random_weights_build_and_run(name, size):
    model = load_model(name, weights="random", device="cpu", input_size=size)
    assert model.weights == "random" and model.describe()["weights"] == "random"
    with torch.inference_mode():
        logits = model.module(model.normalize(torch.rand(1, 3, size, size)))
    assert logits.shape == (1, 1000)


@pytest.mark.slow
def test_efficientnet_lite0_offline_sees_a_cat():
    model = load_model("efficientnet_lite0", device="cpu")
    assert model.weights == "pretrained" and len(model.labels) == 1000
    x = image_to_tensor(sample_photo("chelsea"), 224)
    (result,) = Engine(model).run([Request(image=x, method="slgs", lam=3.5)])
    assert result.predictions[0].label in CAT_CLASSES
    assert result.defended_predictions[0].label in CAT_CLASSES
