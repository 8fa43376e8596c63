"""The fast path of ``LoadedModel.forward`` (issue 8): autocast, channels_last, torch.compile, pinned
copies. CPU tests run everywhere; the CUDA ones skip cleanly without a GPU."""

from __future__ import annotations

import pytest
import torch

from elgs.api.settings import Settings
from elgs.api.state import warmup_batch_sizes
from elgs.engine import Engine, Request
from tests.conftest import make_tiny_model

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


def _batch(photos, n: int = 4) -> torch.Tensor:
    return torch.stack(list(photos.values())[:n])


def test_default_forward_is_the_module_in_float32(tiny_model, photos):
    x = _batch(photos)
    xn = tiny_model.normalize(x).requires_grad_(True)
    logits = tiny_model.forward(xn)
    assert logits.dtype == torch.float32 and tiny_model.compiled is None and tiny_model.autocast_dtype is None
    torch.testing.assert_close(logits, tiny_model.module(xn), rtol=0, atol=0)
    logits.sum().backward()
    assert xn.grad is not None and xn.grad.abs().sum() > 0


def test_bfloat16_autocast_returns_float32_logits_close_to_float32(photos):
    reference, fast = make_tiny_model(), make_tiny_model()
    fast.configure_fast_path(dtype="bfloat16")
    assert fast.autocast_dtype is torch.bfloat16
    x = _batch(photos, 8)
    with torch.inference_mode():
        expected = reference.forward(reference.normalize(x))
        logits = fast.forward(fast.normalize(x))
    assert logits.dtype == torch.float32
    assert not torch.equal(logits, expected)  # it did run in bfloat16
    torch.testing.assert_close(logits, expected, rtol=0.05, atol=0.3)


def test_autocast_engine_keeps_defences_in_float32(photos):
    model = make_tiny_model()
    model.configure_fast_path(dtype=torch.bfloat16)
    image = next(iter(photos.values()))
    result = Engine(model).run([Request(image=image, task="defend", method="slgs", lam=3.5)])[0]
    assert result.image.dtype == torch.float32 and result.mask.dtype == torch.float32
    assert result.saliency.dtype == torch.float32 and result.saliency.abs().sum() > 0


def test_channels_last_on_request_gives_the_same_logits(photos):
    reference, fast = make_tiny_model(), make_tiny_model()
    fast.configure_fast_path(channels_last=True)
    assert fast.channels_last and next(fast.module.parameters()).is_contiguous(memory_format=torch.channels_last)
    x = _batch(photos)
    with torch.inference_mode():
        torch.testing.assert_close(fast.forward(fast.normalize(x)), reference.forward(reference.normalize(x)),
                                   rtol=1e-5, atol=1e-5)


def test_fast_path_rejects_an_unknown_dtype():
    """The documented ValueError, naming the value, for a dtype object or any name but the three."""
    model = make_tiny_model()
    model.configure_fast_path(dtype="bfloat16")
    with pytest.raises(ValueError, match="got torch.int8"):
        model.configure_fast_path(dtype=torch.int8)
    for name in ("float17", "int8", "nn"):  # no such torch attribute, not a float dtype, not a dtype at all
        with pytest.raises(ValueError, match=f"float32, bfloat16 or float16, got {name}$"):
            model.configure_fast_path(dtype=name)
    assert model.autocast_dtype is torch.bfloat16  # a refused dtype leaves the model as it was


def test_settings_read_the_fast_path_from_the_environment(monkeypatch):
    monkeypatch.setenv("ELGS_DTYPE", "bfloat16")
    monkeypatch.setenv("ELGS_COMPILE", "1")
    monkeypatch.setenv("ELGS_TORCH_THREADS", "3")
    settings = Settings()
    assert (settings.dtype, settings.compile, settings.torch_threads) == ("bfloat16", True, 3)
    monkeypatch.setenv("ELGS_DTYPE", "int8")
    with pytest.raises(ValueError, match="dtype"):
        Settings()


def test_warm_up_covers_the_batch_sizes_a_compiled_model_sees():
    assert warmup_batch_sizes(4, compiled=False) == [2] and warmup_batch_sizes(1, compiled=False) == [1]
    assert warmup_batch_sizes(32, compiled=True) == [1, 2, 32]
    assert warmup_batch_sizes(1, compiled=True) == [1]


@pytest.mark.slow
def test_compiled_forward_matches_eager(photos):
    reference, fast = make_tiny_model(), make_tiny_model()
    fast.configure_fast_path(compile=True, compile_backend="eager")
    assert fast.compiled is not None
    requests = [Request(image=image, task="defend", method="slgs", lam=3.5) for image in list(photos.values())[:3]]
    for size in (1, 2, 3):  # the warm-up's sizes, then another: the batch dimension is dynamic by then
        expected = Engine(reference).run(requests[:size])
        for got, want in zip(Engine(fast).run(requests[:size]), expected, strict=True):
            assert [p.index for p in got.defended_predictions] == [p.index for p in want.defended_predictions]
            torch.testing.assert_close(got.image, want.image)


@CUDA
def test_cuda_fast_path_matches_cpu(photos):
    cpu, gpu = make_tiny_model(), make_tiny_model(device="cuda")
    gpu.configure_fast_path()  # channels_last by default on CUDA
    assert gpu.channels_last
    x = _batch(photos)
    moved = gpu.to_input(x)
    assert moved.device.type == "cuda" and moved.dtype == torch.float32
    requests = [Request(image=image, task="defend", method="slgs", lam=3.5) for image in x]
    for got, want in zip(Engine(gpu).run(requests), Engine(cpu).run(requests), strict=True):
        assert [p.index for p in got.predictions] == [p.index for p in want.predictions]
        torch.testing.assert_close(got.image, want.image, rtol=1e-4, atol=1e-4)


@CUDA
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_cuda_autocast_runs_both_passes(photos, dtype):
    model = make_tiny_model(device="cuda")
    model.configure_fast_path(dtype=dtype)
    results = Engine(model).run([Request(image=image, task="defend", method="slgs") for image in photos.values()])
    assert all(r.image.dtype == torch.float32 and r.image.device.type == "cpu" for r in results)
    assert all(len(r.predictions) == len(r.defended_predictions) == 5 for r in results)  # pass 1 and pass 2
    assert all(0 <= r.attack_score <= 2 for r in results)


@CUDA
@pytest.mark.slow
def test_cuda_compile_with_inductor(photos):
    """Inductor on CUDA gives the eager model's answers, at every batch size the warm-up compiles."""
    model, reference = make_tiny_model(device="cuda"), make_tiny_model(device="cuda")
    model.configure_fast_path(compile=True)
    reference.configure_fast_path()
    requests = [Request(image=image, task="defend", method="slgs") for image in photos.values()]
    for size in warmup_batch_sizes(len(requests), compiled=True):
        results = Engine(model).run(requests[:size])
        expected = Engine(reference).run(requests[:size])
        assert len(results) == size
        for got, want in zip(results, expected, strict=True):
            assert [p.index for p in got.predictions] == [p.index for p in want.predictions]
            assert [p.index for p in got.defended_predictions] == [p.index for p in want.defended_predictions]
            torch.testing.assert_close(got.image, want.image, rtol=1e-3, atol=1e-3)


def test_service_applies_the_fast_path_settings_in_the_compute_thread(photos):
    import base64
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from elgs.api import create_app
    from elgs.images import tensor_to_image

    model = make_tiny_model()
    app = create_app(Settings(models=[model.name], dtype="bfloat16"), models=[model])
    buffer = io.BytesIO()
    tensor_to_image(next(iter(photos.values()))).save(buffer, format="PNG")
    with TestClient(app) as client:
        response = client.post("/defend/slgs", files={"image": ("x.png", buffer.getvalue(), "image/png")})
    assert response.status_code == 200, response.text
    assert model.autocast_dtype is torch.bfloat16
    assert Image.open(io.BytesIO(base64.b64decode(response.json()["image"]))).size == (32, 32)
