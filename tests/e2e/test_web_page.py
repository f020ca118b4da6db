"""The search page end to end: ``clipforge serve`` in a subprocess, driven by headless Chromium.

Chromium is Debian's package (``make test`` installs it; no browser download). It is driven
over the DevTools protocol on a pipe (``--remote-debugging-pipe``: NUL-separated JSON on fds
3/4), so no extra Python package and no debugging port are needed. Skipped when absent.
"""

import base64
import io
import json
import os
import select
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from support.runs import free_port

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium is not installed (`make test` installs Debian's package); web page test skipped"
)
PHOTOS = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "camera.png", "hubble_deep_field.jpg"]


class Chromium:
    """A minimal DevTools-protocol client over a pipe; every wait is bounded."""

    def __init__(self, user_dir: Path) -> None:
        to_child, self._out = os.pipe()
        self._in, from_child = os.pipe()
        args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={user_dir}", "--remote-debugging-pipe", "--window-size=1200,900", "about:blank"]  # fmt: skip
        # Chromium reads commands on fd 3 and answers on fd 4; the shell moves our pipes there.
        wrapper = ["/bin/sh", "-c", 'exec 3<&0 4>&1 </dev/null >/dev/null; exec "$@"', "sh"]
        self.proc = subprocess.Popen(wrapper + args, stdin=to_child, stdout=from_child, stderr=subprocess.DEVNULL)
        os.close(to_child)
        os.close(from_child)
        self._buf, self._id, self.events = b"", 0, []
        self.session = None

    def send(self, method: str, params: dict | None = None, timeout: float = 30, page: bool = True) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if page and self.session:
            msg["sessionId"] = self.session
        os.write(self._out, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            for m in self._messages(deadline):
                if m.get("id") == self._id:
                    if "error" in m:
                        raise RuntimeError(f"{method}: {m['error']}")
                    return m["result"]
                self.events.append(m)

    def _messages(self, deadline: float) -> list[dict]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("chromium did not answer in time")
            if select.select([self._in], [], [], left)[0]:
                chunk = os.read(self._in, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self._buf += chunk
        *done, self._buf = self._buf.split(b"\0")
        return [json.loads(m) for m in done]

    def open_page(self) -> None:
        target = self.send("Target.createTarget", {"url": "about:blank"}, page=False)["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True}, page=False)["sessionId"]
        for domain in ("Page", "Runtime", "Network"):
            self.send(f"{domain}.enable")

    def eval(self, expression: str):
        res = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in res:
            raise RuntimeError(f"page script failed: {res['exceptionDetails']}")
        return res["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30):
        """Poll until truthy; errors while a page is still loading (no body yet) just mean "not yet"."""
        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            try:
                value = self.eval(expression)
                if value:
                    return value
            except RuntimeError as e:
                last = e
            time.sleep(0.1)
        raise TimeoutError(f"page never satisfied: {expression} (last error: {last})")

    def close(self) -> None:
        try:
            self.send("Browser.close", page=False, timeout=5)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        os.close(self._in)
        os.close(self._out)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    import skimage
    import torch

    import clipforge
    from clipforge.search.build import build_or_update
    from clipforge.search.embed import EmbedConfig, embed_images
    from clipforge.search.index import IndexConfig
    from clipforge.search.sources import InputSpec, list_images

    root = tmp_path_factory.mktemp("web")
    photos = root / "photos"
    photos.mkdir()
    for name in PHOTOS:
        shutil.copy(Path(skimage.__file__).parent / "data" / name, photos / name)
    model = clipforge.create_model("nano", seed=0)
    clipforge.save(model, root / "model")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model on a shared machine: one thread avoids oversubscription stalls
    try:
        table = list_images(InputSpec(str(photos)))
        embed_images(model, table, root / "emb", EmbedConfig(batch_size=8, num_workers=0, progress=False))
    finally:
        torch.set_num_threads(threads)
    build_or_update([str(root / "emb")], root / "index", IndexConfig(progress=False))
    port = free_port()
    cmd = [sys.executable, "-m", "clipforge", "serve", "--index", str(root / "index"), "--model", str(root / "model"),
           "--host", "127.0.0.1", "--port", str(port), "--threads", "1"]  # fmt: skip
    log = open(root / "server.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if json.load(r)["status"] == "ok":
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"server did not start: {(root / 'server.log').read_text()[-2000:]}")
        time.sleep(0.25)
    yield url, photos
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


@pytest.fixture()
def browser(tmp_path):
    b = Chromium(tmp_path / "chromium-profile")
    b.open_page()
    yield b
    b.close()


def _file_js(var: str, path: Path, mime: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return (f"const {var} = new File([Uint8Array.from(atob('{data}'), c => c.charCodeAt(0))], "
            f"{json.dumps(path.name)}, {{type: '{mime}'}});")  # fmt: skip


def _shot(browser, clip: dict) -> np.ndarray:
    png = base64.b64decode(browser.send("Page.captureScreenshot", {"format": "png", "clip": clip})["data"])
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB").resize((round(clip["width"]),
                                                                          round(clip["height"]))), np.float32)


def _post_explain(url: str, fields: dict) -> bytes:
    import httpx

    r = httpx.post(f"{url}/explain", data=fields, files={"_": ("", b"", "text/plain")}, timeout=60)
    assert r.status_code == 200, r.text
    return r.content


@pytest.mark.slow
def test_search_drop_classify_and_screenshot(server, browser, tmp_path):
    url, photos = server
    # 1. Text search from the URL: a grid of thumbnails with scores, best first.
    browser.send("Page.navigate", {"url": f"{url}/?q=a%20photo%20of%20a%20cat&k=4"})
    browser.wait_for("document.body.dataset.state === 'done'")
    cards = browser.eval("[...document.querySelectorAll('#results .result')].map(c => +c.dataset.score)")
    assert len(cards) == 4 and cards == sorted(cards, reverse=True)
    assert browser.wait_for("[...document.images].filter(i => i.closest('.result')).every(i => i.complete && i.naturalWidth > 0)")
    assert "6 images" in browser.eval("document.getElementById('info').textContent")

    # 1b. "why?" on the first result shows its explanation map in place of the thumbnail: the
    # pixels on screen are the map the server draws for that item and query, and differ from the photo.
    img_js = "document.querySelector('#results .result img')"
    rect = browser.eval(f"(() => {{ const r = {img_js}.getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; }})()")
    clip = {"x": rect[0], "y": rect[1], "width": rect[2], "height": rect[3], "scale": 1}
    before = _shot(browser, clip)
    browser.eval("document.querySelector('#results .result .explain-toggle').click(); true")
    browser.wait_for(f"{img_js}.dataset.explained === '1' && {img_js}.complete && {img_js}.naturalWidth === 224")
    after = _shot(browser, clip)
    item = browser.eval("document.querySelector('#results .result').dataset.id")
    drawn = _post_explain(url, {"id": item, "text": "a photo of a cat"})
    expected = np.asarray(Image.open(io.BytesIO(drawn)).convert("RGB").resize(after.shape[1::-1]), np.float32)
    assert np.abs(after - expected).mean() < 12, "the page does not show the server's map"
    assert np.abs(before - expected).mean() > 2 * np.abs(after - expected).mean()
    browser.eval("document.querySelector('#results .result .explain-toggle').click(); true")  # toggled back
    assert browser.wait_for(f"{img_js}.dataset.explained === '0'")

    # 2. Drag and drop a photo onto the page: it comes back first.
    browser.eval("document.body.dataset.state = 'idle'")
    browser.eval(_file_js("f", photos / "rocket.jpg", "image/jpeg") + """
        const dt = new DataTransfer(); dt.items.add(f);
        document.getElementById('drop').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
        true""")
    browser.wait_for("document.body.dataset.state === 'done'")
    first = browser.eval("({...document.querySelector('#results .result').dataset})")
    assert first["path"] == str(photos / "rocket.jpg") and float(first["score"]) > 0.99

    # 3. Classify panel: probabilities for every label, best first, summing to 1.
    browser.eval("document.body.dataset.state = 'idle'")
    browser.eval(_file_js("g", photos / "chelsea.png", "image/png") + """
        const dt2 = new DataTransfer(); dt2.items.add(g);
        const input = document.getElementById('cls-file'); input.files = dt2.files;
        input.dispatchEvent(new Event('change'));
        document.getElementById('labels').value = 'cat\\nrocket\\ncoffee cup';
        document.getElementById('classify-btn').click(); true""")
    browser.wait_for("document.body.dataset.state === 'done'")
    rows = browser.eval("[...document.querySelectorAll('.label-row')].map(r => [r.dataset.label, +r.dataset.probability])")
    assert sorted(label for label, _ in rows) == ["cat", "coffee cup", "rocket"]
    probs = [p for _, p in rows]
    assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-4

    # 3b. A label's map replaces the classified image's preview, and the next label's map replaces it.
    preview = "document.getElementById('cls-preview')"
    browser.eval("document.querySelectorAll('.label-row .explain-toggle')[0].click(); true")
    browser.wait_for(f"{preview}.dataset.explained === '1' && {preview}.complete && {preview}.naturalWidth === 224")
    first_map = browser.eval(f"{preview}.src")
    browser.eval("document.querySelectorAll('.label-row .explain-toggle')[1].click(); true")
    browser.wait_for(f"{preview}.src !== {json.dumps(first_map)} && {preview}.dataset.explained === '1'")
    browser.eval("document.querySelectorAll('.label-row .explain-toggle')[1].click(); true")
    browser.wait_for(f"{preview}.dataset.explained === '0' && {preview}.src.startsWith('blob:')")

    # 4. A screenshot of results + classification renders something (not a blank page).
    png = base64.b64decode(browser.send("Page.captureScreenshot", {"format": "png"})["data"])
    (tmp_path / "page.png").write_bytes(png)
    shot = Image.open(io.BytesIO(png)).convert("L")
    assert shot.size[0] >= 800 and len(np.unique(np.asarray(shot.resize((64, 48))))) > 20

    # 5. A malformed request shows the server's 4xx message on the page.
    browser.eval("""document.getElementById('filter').value = '{"bad key!": 1}';
        document.getElementById('query').value = 'x';
        document.getElementById('search-btn').click(); true""")
    browser.wait_for("document.body.dataset.state === 'error'")
    assert "filter" in browser.eval("document.getElementById('status').textContent")

    # 6. Every request went to this server (no CDN, no external fetch).
    urls = [e["params"]["request"]["url"] for e in browser.events if e.get("method") == "Network.requestWillBeSent"]
    assert urls and all(u.startswith((url, "data:", "blob:")) for u in urls), urls
