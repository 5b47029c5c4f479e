"""Fixtures for the data tests: a local HTTP server that serves small COCO-style zips (supports Range)."""

from __future__ import annotations

import io
import json
import re
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image


class _Server(ThreadingHTTPServer):
    files: dict[str, bytes]
    log: list[dict]
    honour_range: bool = True
    cut_after: int | None = None  # send only this many body bytes, then drop the connection
    cut_times: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802
        data = self.server.files.get(self.path)
        rng = self.headers.get("Range")
        entry = {"path": self.path, "range": rng, "status": 404, "sent": 0}
        self.server.log.append(entry)
        if data is None:
            self.send_error(404, "not found")
            return
        start = 0
        m = re.fullmatch(r"bytes=(\d+)-", rng or "")
        if m and self.server.honour_range:
            start = int(m.group(1))
            if start >= len(data):
                entry["status"] = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            entry["status"] = 206
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            entry["status"] = 200
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.server.cut_after is not None and self.server.cut_times > 0:
            self.server.cut_times -= 1
            body = body[: self.server.cut_after]
        # logged before the write: once the client has every byte the test may read the log at once
        entry["sent"] = len(body)
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.fixture
def server() -> Iterator[_Server]:
    images = {f"val2017/{i:012d}.png": _png(i) for i in (1, 2, 3)}
    instances = {
        "images": [{"id": i, "file_name": f"{i:012d}.png", "width": 32, "height": 24} for i in (1, 2, 3)],
        "annotations": [{"id": 1, "image_id": 2, "category_id": 5, "bbox": [1, 1, 5, 5], "area": 25, "iscrowd": 0}],
        "categories": [{"id": 1, "name": "one"}, {"id": 5, "name": "five"}],
    }
    annotations = {
        "annotations/instances_val2017.json": json.dumps(instances).encode(),
        "annotations/captions_val2017.json": b"{}",
    }
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.files = {"/zips/val2017.zip": _zip(images), "/annotations/annotations_trainval2017.zip": _zip(annotations)}
    srv.log = []
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


