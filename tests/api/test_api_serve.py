"""``elgs serve``: the offline end-to-end check with EfficientNet-Lite0, and its argument errors."""

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from PIL import Image

from elgs.api import Settings
from elgs.cli import main
from tests.api.helpers import encode

IMAGENET_CATS = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_serve_efficientnet_lite0_defends_chelsea():
    from elgs.images import sample_photo

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ELGS_")} | {"ELGS_DEVICE": "cpu"}
    server = subprocess.Popen([sys.executable, "-m", "elgs", "serve", "--models", "efficientnet_lite0", "--port",
                               str(port), "--log-level", "warning"], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stdout.read()
            assert time.monotonic() < deadline, "never ready"
            try:
                if httpx.get(f"{url}/health/ready", timeout=2, trust_env=False).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        chelsea = encode(sample_photo("chelsea"))
        with httpx.Client(base_url=url, timeout=60, trust_env=False) as client:
            response = client.post("/defend/slgs", params={"lambda": 3.5},
                                   files={"image": ("chelsea.png", chelsea, "image/png")})
            assert response.status_code == 200, response.text
            body = response.json()
            as_png = client.post("/defend/slgs", params={"lambda": 3.5, "response": "image"},
                                 files={"image": ("chelsea.png", chelsea, "image/png")})
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    assert (body["model"], body["weights"], body["lambda"]) == ("efficientnet_lite0", "pretrained", 3.5)
    assert any(p["index"] in IMAGENET_CATS for p in body["original_predictions"])
    assert any(p["index"] in IMAGENET_CATS for p in body["predictions"])
    image = Image.open(io.BytesIO(base64.b64decode(body["image"])))
    mask = Image.open(io.BytesIO(base64.b64decode(body["mask"])))
    assert (image.size, image.mode, mask.size, mask.mode) == ((224, 224), "RGB", (224, 224), "L")
    assert as_png.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(as_png.content)).size == (224, 224)
    assert server.returncode == 0


def test_serve_refuses_an_unknown_model(capsys):
    assert main(["serve", "--models", "resnet9000"]) == 2
    error = capsys.readouterr().err
    assert "unknown model 'resnet9000'; choose one of vgg16, inception_v3, efficientnet_lite0" in error


def test_serve_refuses_bad_settings(capsys):
    assert main(["serve", "--models", "efficientnet_lite0", "--max-batch-size", "0"]) == 2
    assert "max_batch_size" in capsys.readouterr().err


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("ELGS_MODELS", "vgg16, inception_v3")
    monkeypatch.setenv("ELGS_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("ELGS_API_KEY", "s3cr3t-key")
    settings = Settings()
    assert settings.models == ["vgg16", "inception_v3"] and settings.max_batch_size == 8
    assert settings.api_key.get_secret_value() == "s3cr3t-key" and "s3cr3t" not in repr(settings)
    monkeypatch.setenv("ELGS_API_KEY", "")
    monkeypatch.delenv("ELGS_MAX_BATCH_SIZE")
    settings = Settings()
    assert settings.api_key is None and settings.max_upload_mb == 20 and settings.max_pixels == 40_000_000
    import torch
    assert settings.batch_size_for(torch.device("cpu")) == 4 and settings.batch_size_for(torch.device("cuda")) == 32
