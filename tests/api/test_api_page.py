"""The web page in a real browser: headless Chromium (Debian's package), driven over the DevTools protocol."""

import json
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect

from elgs.images import sample_photo
from tests.api.helpers import LiveServer, tiny_settings
from tests.conftest import make_tiny_model

CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium (apt-get install chromium)")


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
    profile = tmp_path / "profile"
    process = subprocess.Popen(
        [str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
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
        assert browser.evaluate("document.getElementById('method').value") == "slgs"
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
        expected = httpx.post(f"{server.url}/defend/slgs", params={"model": "tiny", "lambda": "2.5"},
                              files={"image": ("chelsea.png", chelsea.read_bytes(), "image/png")},
                              trust_env=False).json()
    assert page["original"] == [p["label"] for p in expected["original_predictions"]]
    assert page["defended"] == [p["label"] for p in expected["predictions"]]
    assert len(page["original"]) == len(page["defended"]) == 5
    assert page["originalSize"] == [451, 300]  # the uploaded photo itself
    assert page["maskSize"] == page["defendedSize"] == [32, 32]  # the model's input size
    assert "tiny (random weights)" in page["meta"]
