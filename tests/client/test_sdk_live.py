"""The SDK through a real uvicorn on 127.0.0.1: sync and async, timeouts, ELGS_URL, and the README's
examples run as written (with the README's URL pointed at the test server)."""

from __future__ import annotations

import asyncio
import re
import runpy

import pytest

from elgs_client import APITimeoutError, AsyncClient, Client
from tests.client import SDK_ROOT


def test_sync_and_async_through_uvicorn(live_server, photo_png):
    with Client(live_server.url) as client:
        assert client.health().ready
        sync_results = [client.classify(photo_png), client.defend(photo_png, method="slgs", lam=2.5),
                        client.saliency(photo_png)]
        models = client.models()

    async def run_async():
        async with AsyncClient(live_server.url) as client:
            results = [await client.classify(photo_png), await client.defend(photo_png, method="slgs", lam=2.5),
                       await client.saliency(photo_png)]
            concurrent = await asyncio.gather(*(client.defend(photo_png, method="wlgs") for _ in range(6)))
            return results, concurrent, await client.models()

    async_results, concurrent, async_models = asyncio.run(run_async())
    assert models == async_models and models[0].name == "tiny"
    for from_sync, from_async in zip(sync_results, async_results):
        assert from_sync.model_dump(exclude={"timing_ms"}) == from_async.model_dump(exclude={"timing_ms"})
    # Concurrent requests, batched together or not, all get the answer of their own image (equal up to
    # float rounding, which depends on the batch size).
    for result in concurrent:
        for got, expected in ((result.predictions, concurrent[0].predictions),
                              (result.original_predictions, sync_results[0].predictions)):
            assert [p.index for p in got] == [p.index for p in expected]
            assert [p.score for p in got] == pytest.approx([p.score for p in expected], rel=1e-4, abs=1e-6)


def test_base_url_from_environment_and_client_timeout(live_server, photo_png, monkeypatch):
    monkeypatch.setenv("ELGS_URL", live_server.url)
    live_server.control.delay_s = 0.6
    try:
        with Client(timeout=0.2, max_retries=2) as client:
            assert client.base_url == live_server.url
            with pytest.raises(APITimeoutError, match="timed out"):
                client.classify(photo_png)
    finally:
        live_server.control.delay_s = 0.0
    with Client(timeout=10) as client:
        assert client.classify(photo_png).model == "tiny"


def readme_python_blocks() -> list[str]:
    text = (SDK_ROOT / "README.md").read_text()
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_examples_run_as_written(live_server, photo_png, tmp_path, monkeypatch, capsys):
    import io

    from PIL import Image

    blocks = readme_python_blocks()
    assert len(blocks) >= 4
    Image.open(io.BytesIO(photo_png)).save(tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ELGS_URL", live_server.url)
    monkeypatch.delenv("ELGS_API_KEY", raising=False)
    for index, block in enumerate(blocks):
        script = tmp_path / f"readme_{index}.py"
        script.write_text(block.replace("http://localhost:8000", live_server.url))
        runpy.run_path(str(script), run_name="__main__")
    output = capsys.readouterr().out
    assert "ready=True" in output and "['tiny']" in output and "422" in output and "404" in output
    assert (tmp_path / "out" / "slgs.png").is_file() and (tmp_path / "out" / "saliency_region.png").is_file()
