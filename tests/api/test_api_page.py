"""The web page in a real browser: headless Chromium (Debian's package, found on PATH), driven over the DevTools
protocol. Without Chromium the tests skip, except under CI (``CI=true``), where they fail."""

import base64
import io
import json
import subprocess
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from websockets.sync.client import connect

from elgs.api.routes.page import STATIC_DIR
from elgs.images import sample_photo
from tests.api.helpers import LiveServer, tiny_settings
from tests.conftest import make_tiny_model
from tests.tools import require_program



class DevTools:
    """A minimal Chrome DevTools protocol client over one page's websocket."""

    def __init__(self, socket) -> None:
        self.socket = socket
        self.next_id = 0

    def call(self, method: str, **params):
        self.next_id += 1
        self.socket.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv(timeout=20))
            if message.get("id") == self.next_id:  # events (no id) are ignored
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 20.0):
        deadline = time.monotonic() + timeout
        while not (value := self.evaluate(expression)):
            if time.monotonic() > deadline:
                status = self.evaluate("document.getElementById('status')?.textContent")
                raise AssertionError(f"timed out waiting for {expression}; page status: {status}")
            time.sleep(0.05)
        return value


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium on about:blank, found on PATH (skipped without it, failed under CI)."""
    chromium = require_program("chromium", "chromium-browser", install="apt-get install chromium")
    profile = tmp_path / "profile"
    process = subprocess.Popen(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-proxy-server",
         f"--user-data-dir={profile}", "--remote-debugging-port=0", "--remote-allow-origins=*", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().strip()):
            assert process.poll() is None, "chromium exited at start"
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        targets = httpx.get(f"http://127.0.0.1:{port}/json/list", trust_env=False).json()
        pages = [target for target in targets if target["type"] == "page"]
        with connect(pages[0]["webSocketDebuggerUrl"], max_size=None, open_timeout=10) as socket:
            yield DevTools(socket)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_upload_chelsea_click_defend_and_see_both_top5_lists_and_images(browser, tmp_path):
    chelsea = tmp_path / "chelsea.png"
    sample_photo("chelsea").save(chelsea)
    with LiveServer(tiny_settings(), [make_tiny_model()]) as server:
        browser.call("Page.navigate", url=f"{server.url}/")
        browser.wait_for("document.body && document.body.dataset.ready === 'true'")
        assert browser.evaluate("document.getElementById('method').value") == "auto"
        document = browser.call("DOM.getDocument")["root"]["nodeId"]
        file_input = browser.call("DOM.querySelector", nodeId=document, selector="#image")["nodeId"]
        browser.call("DOM.setFileInputFiles", nodeId=file_input, files=[str(chelsea)])
        browser.evaluate("const l = document.getElementById('lambda'); l.value = '2.5';"
                         "l.dispatchEvent(new Event('input')); true")
        browser.evaluate("document.getElementById('run').click(); true")
        state = browser.wait_for("['done', 'error'].includes(document.body.dataset.state) "
                                 "&& document.body.dataset.state")
        page = browser.evaluate("""(() => {
            const labels = (id) => [...document.querySelectorAll(`#${id} li`)].map((li) => li.firstChild.textContent);
            const size = (id) => [document.getElementById(id).naturalWidth, document.getElementById(id).naturalHeight];
            return {state: document.body.dataset.state, status: document.getElementById('status').textContent,
                    original: labels('original-predictions'), defended: labels('defended-predictions'),
                    originalSize: size('original'), maskSize: size('mask'), defendedSize: size('defended'),
                    meta: document.getElementById('meta').textContent};
        })()""")
        assert state == "done", page["status"]
        expected = httpx.post(f"{server.url}/defend/auto", params={"model": "tiny", "lambda": "2.5"},
                              files={"image": ("chelsea.png", chelsea.read_bytes(), "image/png")},
                              trust_env=False).json()
    assert page["original"] == [p["label"] for p in expected["original_predictions"]]
    assert page["defended"] == [p["label"] for p in expected["predictions"]]
    assert len(page["original"]) == len(page["defended"]) == 5
    assert page["originalSize"] == [451, 300]  # the uploaded photo itself
    assert page["maskSize"] == page["defendedSize"] == [32, 32]  # the model's input size
    assert "tiny (random weights)" in page["meta"]


def _page_png(browser, expression: str) -> np.ndarray:
    """An RGB array of a PNG the page holds: ``expression`` evaluates to a base64 PNG (awaited)."""
    encoded = browser.evaluate(expression)
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(encoded))).convert("RGB"))


def _tinted_view(browser, region_png: bytes, input_png: bytes, size: int) -> np.ndarray:
    """The page's saliency view drawn by its own ``drawSaliency`` from a given region and input."""
    region64, input64 = base64.b64encode(region_png).decode(), base64.b64encode(input_png).decode()
    return _page_png(browser, f"""(async () => {{
        const input = await (await fetch('data:image/png;base64,{input64}')).blob();
        await drawSaliency(input, '{region64}', {size});
        return document.getElementById('saliency-view').toDataURL('image/png').split(',')[1];
    }})()""")


BLOB_AS_BASE64 = """(async () => {
    const bytes = new Uint8Array(await (await fetch(document.getElementById('original').src)).arrayBuffer());
    let text = '';
    for (const byte of bytes) text += String.fromCharCode(byte);
    return btoa(text);
})()"""


def test_paste_the_sample_patch_switch_sends_the_patched_image_and_shows_the_saliency_region(browser, tmp_path):
    chelsea = tmp_path / "chelsea.png"
    sample_photo("chelsea").save(chelsea)
    patch = np.asarray(Image.open(STATIC_DIR / "sample-patch.png").convert("RGB"))
    meta = json.loads((STATIC_DIR / "sample-patch.json").read_text())
    size = meta["image_size"]  # the tiny model at the patch's own size: pasted pixel for pixel
    with LiveServer(tiny_settings(), [make_tiny_model(input_size=size)]) as server:
        browser.call("Page.navigate", url=f"{server.url}/")
        browser.wait_for("document.body && document.body.dataset.ready === 'true'")
        document = browser.call("DOM.getDocument")["root"]["nodeId"]
        file_input = browser.call("DOM.querySelector", nodeId=document, selector="#image")["nodeId"]
        browser.call("DOM.setFileInputFiles", nodeId=file_input, files=[str(chelsea)])
        browser.evaluate("document.getElementById('paste-patch').click(); true")
        browser.evaluate("document.getElementById('run').click(); true")
        state = browser.wait_for("['done', 'error'].includes(document.body.dataset.state) "
                                 "&& document.body.dataset.state")
        status = browser.evaluate("document.getElementById('status').textContent")
        assert state == "done", status
        sent = _page_png(browser, BLOB_AS_BASE64)
        view = _page_png(browser, "document.getElementById('saliency-view').toDataURL('image/png').split(',')[1]")
        labels = browser.evaluate("""(() => {
            const labels = (id) => [...document.querySelectorAll(`#${id} li`)].map((li) => li.firstChild.textContent);
            const text = (id) => document.getElementById(id).textContent;
            return {original: labels('original-predictions'), defended: labels('defended-predictions'),
                    info: text('patch-info'), score: text('attack-score'), verdict: text('attack-verdict'),
                    answer: text('final-answer'), verdictShown: !document.getElementById('verdict').hidden};
        })()""")
        decided = {(flag, removal): browser.evaluate(f"""(() => {{
            showVerdict({{attack_score: 0.9, attack_threshold: 0.25, attacked: {flag},
                          final_predictions: [{{label: 'toaster', score: 0.5}}],
                          {"removal_top1: {label: 'toaster', score: 0.5}, removal_score: 1.5, removal_threshold: 1.1"
                           if removal else ""}}});
            return [document.getElementById('attack-verdict').textContent,
                    document.getElementById('attack-verdict').className,
                    document.getElementById('final-answer').textContent,
                    document.getElementById('attack-score').textContent];
        }})()""") for flag in ("true", "false") for removal in (True, False)}
        buffer = io.BytesIO()
        Image.fromarray(sent).save(buffer, format="PNG")
        png = buffer.getvalue()
        expected = httpx.post(f"{server.url}/defend/auto", params={"model": "tiny"},
                              files={"image": ("sent.png", png, "image/png")}, trust_env=False).json()
        region = httpx.post(f"{server.url}/saliency", params={"model": "tiny"},
                            files={"image": ("sent.png", png, "image/png")}, trust_env=False).json()["region"]

    side, margin = meta["patch_size"], 10
    assert sent.shape == (size, size, 3)
    # the patch sits at the paper's test placement, pixel for pixel
    np.testing.assert_array_equal(sent[margin:margin + side, size - margin - side:size - margin], patch)
    # and the rest is the photo resized by the browser (close to, not equal to, Pillow's bilinear)
    resized = np.asarray(sample_photo("chelsea").convert("RGB").resize((size, size), Image.Resampling.BILINEAR))
    outside = np.ones((size, size), dtype=bool)
    outside[margin:margin + side, size - margin - side:size - margin] = False
    assert np.abs(sent.astype(float) - resized)[outside].mean() < 8
    assert labels["original"] == [p["label"] for p in expected["original_predictions"]]
    assert labels["defended"] == [p["label"] for p in expected["predictions"]]
    assert meta["target_label"] in labels["info"]
    # the attack score, the cascade's path and the verdict the page's default (auto) got
    assert labels["verdictShown"] and labels["score"].startswith(f"{expected['attack_score']:.3f} of 2")
    assert ("LGS screen" if expected["path"] == "screen" else "decided by SLGS") in labels["score"]
    assert labels["verdict"] == {None: "undecided", False: "looks clean", True: "attacked"}[expected["attacked"]]
    assert labels["answer"].startswith(expected["final_predictions"][0]["label"] + " (")
    assert decided["true", True] == ["attacked", "verdict attacked",
                                     "toaster (50.0%), from the image with the suspected patch removed",
                                     "0.900 of 2 (threshold 0.250); suspect removed: 1.500 (threshold 1.100)"]
    assert decided["true", False][:3] == ["attacked", "verdict attacked", "toaster (50.0%), from the defended image"]
    assert decided["false", True][:3] == ["looks clean", "verdict clean", "toaster (50.0%), from the original image"]
    assert decided["false", False][3] == "0.900 of 2 (threshold 0.250)"
    # the saliency view: the input where the region is 0 (the tiny model's region may be empty) ...
    inside = np.asarray(Image.open(io.BytesIO(base64.b64decode(region))).convert("L")) > 127
    assert np.abs(view.astype(int) - sent.astype(int))[~inside].max() <= 2
    # ... and tinted red inside it: the same drawing with a region that is the left half of the image
    half = np.zeros((size, size), dtype=np.uint8)
    half[:, : size // 2] = 255
    buffer = io.BytesIO()
    Image.fromarray(half).save(buffer, format="PNG")
    tinted = _tinted_view(browser, buffer.getvalue(), png, size)
    left, right = tinted[:, : size // 2], tinted[:, size // 2 :]
    assert left[..., 0].min() >= 189  # red channel pushed to at least 0.75 * 255
    assert np.abs(left[..., 1:].astype(int) - sent[:, : size // 2, 1:]).max() <= 2  # green, blue unchanged
    assert np.abs(right.astype(int) - sent[:, size // 2 :]).max() <= 2
