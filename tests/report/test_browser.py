"""Load generated reports in headless Chromium, driven over the DevTools protocol on a pipe.

Checks: no console errors, exceptions or failed/external requests; the plots are in the DOM; the table
sorter works; a 1400×3000 screenshot is far from blank. Skipped when /usr/bin/chromium is absent
(`apt-get install -y chromium`). No extra Python package: the protocol is JSON messages separated by NUL
bytes on file descriptors 3 (commands) and 4 (replies) of the browser (`--remote-debugging-pipe`).
"""

from __future__ import annotations

import base64
import json
import os
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None and Path("/usr/bin/chromium").exists():
    CHROMIUM = "/usr/bin/chromium"

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium); browser checks skipped"
)

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    "--mute-audio",
    "--window-size=1400,3000",
]
TIMEOUT_S = 30.0


class Browser:
    """A headless Chromium with one page, spoken to over --remote-debugging-pipe."""

    def __init__(self, user_data_dir: Path) -> None:
        cmd_r, cmd_w = os.pipe()  # we write commands, the browser reads them on its fd 3
        res_r, res_w = os.pipe()  # the browser writes replies on its fd 4, we read them

        def wire_fds() -> None:  # runs in the child, before exec; dup2'd fds are inheritable
            a, b = os.dup(cmd_r), os.dup(res_w)  # out of the way first: a pipe end may sit at 3 or 4
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={user_data_dir}", "--remote-debugging-pipe", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=False,  # os.pipe() fds are non-inheritable anyway; only 3 and 4 reach the browser
            preexec_fn=wire_fds,  # noqa: PLW1509
        )
        os.close(cmd_r)
        os.close(res_w)
        self._out = os.fdopen(cmd_w, "wb", buffering=0)
        self._in = os.fdopen(res_r, "rb", buffering=0)
        self._next_id = 0
        self._replies: dict[int, dict[str, Any]] = {}
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def _read(self) -> None:
        buf = b""
        while True:
            chunk = self._in.read(65536)
            if not chunk:
                return
            buf += chunk
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                msg = json.loads(raw)
                if "id" in msg:
                    with self._cond:
                        self._replies[msg["id"]] = msg
                        self._cond.notify_all()
                else:
                    self.events.put(msg)

    def call(self, method: str, session: bool = False, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        msg: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            msg["sessionId"] = self.session
        self._out.write(json.dumps(msg).encode() + b"\0")
        with self._cond:
            ok = self._cond.wait_for(lambda: msg["id"] in self._replies, timeout=TIMEOUT_S)
        assert ok, f"no reply to {method}"
        reply = self._replies.pop(msg["id"])
        assert "error" not in reply, f"{method}: {reply['error']}"
        return reply.get("result", {})

    def page(self, method: str, **params: Any) -> dict[str, Any]:
        return self.call(method, session=True, **params)

    def evaluate(self, expression: str) -> Any:
        result = self.page("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def drain(self) -> list[dict[str, Any]]:
        out = []
        while True:
            try:
                out.append(self.events.get_nowait())
            except queue.Empty:
                return out

    def wait_for(self, method: str) -> list[dict[str, Any]]:
        """Wait for the event `method`; return every event seen until then."""
        seen = []
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                event = self.events.get(timeout=0.2)
            except queue.Empty:
                continue
            seen.append(event)
            if event.get("method") == method:
                return seen
        raise AssertionError(f"timed out waiting for {method}")

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (AssertionError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Browser]:
    b = Browser(tmp_path_factory.mktemp("chromium-profile"))
    for domain in ("Runtime", "Log", "Page", "Network"):
        b.page(f"{domain}.enable")
    b.page("Emulation.setDeviceMetricsOverride", width=1400, height=3000, deviceScaleFactor=1, mobile=False)
    yield b
    b.close()


def load(browser: Browser, path: Path) -> dict[str, list[str]]:
    """Open `path`; return console errors/exceptions, failed requests and every requested URL."""
    browser.drain()
    browser.page("Page.navigate", url=path.resolve().as_uri())
    events = browser.wait_for("Page.loadEventFired")
    time.sleep(0.3)  # let late errors arrive
    events += browser.drain()
    problems: dict[str, list[str]] = {"errors": [], "failed": [], "urls": []}
    for e in events:
        method, p = e.get("method"), e.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = p["exceptionDetails"]
            problems["errors"].append(str(details.get("exception", {}).get("description") or details.get("text")))
        elif method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert", "warning"):
            problems["errors"].append(json.dumps(p.get("args"))[:300])
        elif method == "Log.entryAdded" and p["entry"]["level"] in ("error", "warning"):
            problems["errors"].append(p["entry"].get("text", "")[:300])
        elif method == "Network.requestWillBeSent":
            problems["urls"].append(p["request"]["url"])
        elif method == "Network.loadingFailed":
            problems["failed"].append(p.get("errorText", ""))
    return problems


def screenshot(browser: Browser, path: Path) -> Path:
    data = browser.page("Page.captureScreenshot", format="png")["data"]
    path.write_bytes(base64.b64decode(data))
    return path


def colour_stats(png: Path) -> tuple[int, float, tuple[int, int]]:
    from PIL import Image

    with Image.open(png) as im:
        rgb = im.convert("RGB")
        colours = rgb.getcolors(maxcolors=1 << 20) or []
        size = rgb.size
        white = sum(n for n, c in colours if min(c) >= 250)
    return len(colours), 1 - white / (size[0] * size[1]), size


@pytest.fixture(scope="module")
def report_dir(report_store, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from harness.report.data import load_ablations
    from harness.report.render import write_html_reports
    from harness.tracking import query

    out = tmp_path_factory.mktemp("browser-reports")
    write_html_reports(load_ablations(query.open_store(report_store.uri)), out)
    return out


def test_report_page_loads_clean_with_plots_and_sorter(browser: Browser, report_dir: Path, tmp_path: Path) -> None:
    found = load(browser, report_dir / "dcn_placement.html")
    assert found["errors"] == [] and found["failed"] == []
    assert all(u.startswith(("file:", "data:")) for u in found["urls"]), found["urls"]
    assert browser.evaluate("document.querySelectorAll('svg').length") == 5
    assert browser.evaluate("document.querySelectorAll('#comparison-table tbody tr').length") == 6
    # click "best on val" mAP (column 2) twice: ascending, then descending
    column = "Array.from(document.querySelectorAll('#comparison-table tbody tr')).map(r => r.cells[2].dataset.sort)"
    browser.evaluate("document.querySelector('#comparison-table th[data-col=\"2\"]').click()")
    up = [float(v) for v in browser.evaluate(column)]
    browser.evaluate("document.querySelector('#comparison-table th[data-col=\"2\"]').click()")
    down = [float(v) for v in browser.evaluate(column)]
    assert up == sorted(up) and down == sorted(up, reverse=True) and len(up) == 6
    assert load(browser, report_dir / "dcn_placement.html")["errors"] == []
    png = screenshot(browser, tmp_path / "dcn_placement.png")
    n_colours, inked, size = colour_stats(png)
    assert size == (1400, 3000)
    assert n_colours > 1000 and inked > 0.05, (n_colours, inked)


def test_escaped_and_failed_only_pages_load_clean(browser: Browser, report_dir: Path) -> None:
    found = load(browser, report_dir / "xss.html")
    assert found["errors"] == [] and found["failed"] == []
    assert browser.evaluate("document.querySelectorAll('script').length") == 1
    names = browser.evaluate("Array.from(document.querySelectorAll('td.grp b')).map(b => b.textContent)")
    assert "<script>alert(1)</script>" in names  # shown as text
    svg_text = browser.evaluate("Array.from(document.querySelectorAll('svg text')).map(t => t.textContent).join('|')")
    assert "<script>alert(1)</script>" in svg_text
    for page in ("index.html", "no_baseline.html", "all_failed.html"):
        found = load(browser, report_dir / page)
        assert found["errors"] == [] and found["failed"] == [], page
    text = browser.evaluate("document.body.innerText")  # all_failed.html
    assert "all 2 runs of this ablation failed" in text and text.count("FileNotFoundError: data/train.json") == 2


def test_the_checks_can_fail(browser: Browser, tmp_path: Path) -> None:
    bad = tmp_path / "bad.html"
    bad.write_text(
        '<!DOCTYPE html><html><body><p>x</p><img src="http://127.0.0.1:9/x.png"><script>notDefined();</script>'
        "</body></html>"
    )
    found = load(browser, bad)
    assert any("notDefined" in e for e in found["errors"])
    assert "http://127.0.0.1:9/x.png" in found["urls"] and found["failed"]
    blank = screenshot(browser, tmp_path / "blank.png")
    n_colours, inked, _ = colour_stats(blank)
    assert n_colours < 1000 or inked < 0.05


def test_report_of_a_real_run_loads_clean(browser: Browser, synth_root: Path, tmp_path: Path) -> None:
    """The whole path a user takes: `harness run` on real files, `harness report`, a browser."""
    from harness.cli import main

    ablation = tmp_path / "real.yaml"
    ablation.write_text(f"""
name: real_run
description: standard vs deformable, <b>escaped</b>
baseline: standard
base:
  data: {{source: coco, root: "{synth_root}", image_size: 32}}
  model: {{arch: small3}}
  train: {{epochs: 2, batch_size: 16, lr: 0.003}}
  profile: {{wait: 0, warmup: 1, active: 1}}
variants:
  standard: {{model: {{deform_layers: none}}}}
  deform: {{model: {{deform_layers: "first:1"}}}}
grid:
  seed: [0, 1]
""")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert main(["run", str(ablation), "--tracking-uri", uri, "--results-dir", str(tmp_path / "results")]) == 0
    out = tmp_path / "reports"
    assert main(["report", "real_run", "--tracking-uri", uri, "--out", str(out)]) == 0
    page = out / "real_run.html"
    found = load(browser, page)
    assert found["errors"] == [] and found["failed"] == []
    assert all(u.startswith(("file:", "data:")) for u in found["urls"]), found["urls"]
    assert browser.evaluate("document.querySelectorAll('svg').length") >= 3
    assert browser.evaluate("document.querySelectorAll('#comparison-table tbody tr').length") == 2
    text = browser.evaluate("document.body.innerText")
    assert "<b>escaped</b>" in text and "4 finished" in text
    png = screenshot(browser, tmp_path / "real_run.png")
    n_colours, inked, _ = colour_stats(png)
    assert n_colours > 500 and inked > 0.05, (n_colours, inked)
