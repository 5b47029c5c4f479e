"""COCO download against a local HTTP server (127.0.0.1 only): Range resume, size and checksum checks, unpacking."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from harness.data import KnownFile, download_coco, download_file, load_split, unpack_zip
from harness.errors import HarnessError

# `server` (tests/data/conftest.py): a Range-capable HTTP server on 127.0.0.1 serving a small
# val2017.zip and annotations_trainval2017.zip in the official layout.


def _md5(data: bytes) -> tuple[str, str]:
    return ("md5", hashlib.md5(data).hexdigest())


def _known(srv) -> dict[str, KnownFile]:
    val = srv.files["/zips/val2017.zip"]
    ann = srv.files["/annotations/annotations_trainval2017.zip"]
    return {"val2017.zip": KnownFile(len(val), _md5(val)),
            "annotations_trainval2017.zip": KnownFile(None, ("sha256", hashlib.sha256(ann).hexdigest()))}


def test_download_and_unpack_official_layout(server, tmp_path: Path) -> None:
    dest = tmp_path / "coco"
    calls: list[tuple[str, int, int]] = []
    result = download_coco(dest, ["val2017"], base_url=server.url + "/", known=_known(server), backoff=0,
                           progress=lambda *a: calls.append(a))
    assert sorted(result.downloaded) == ["annotations_trainval2017.zip", "val2017.zip"]
    assert sorted(p.name for p in (dest / "val2017").iterdir()) == [f"{i:012d}.png" for i in (1, 2, 3)]
    assert (dest / "annotations" / "instances_val2017.json").is_file()
    assert not (dest / "annotations" / "captions_val2017.json").exists()  # only instances files are unpacked
    assert not (dest / "val2017.zip").exists() and not list(dest.glob("*.part"))
    split = load_split(dest, "val2017")
    assert split.image_ids == [1, 2, 3] and split.targets.tolist() == [[0, 0], [0, 1], [0, 0]]
    assert any(c[0] == "downloading val2017.zip" and c[1] == c[2] > 0 for c in calls)
    n_requests = len(server.log)
    again = download_coco(dest, ["val2017"], base_url=server.url, known=_known(server))
    assert again.downloaded == [] and len(server.log) == n_requests  # nothing fetched twice


def test_resume_from_part_file(server, tmp_path: Path) -> None:
    data = server.files["/zips/val2017.zip"]
    half = len(data) // 2
    (tmp_path / "val2017.zip.part").write_bytes(data[:half])
    out = download_file(server.url + "/zips/val2017.zip", tmp_path / "val2017.zip",
                        known=KnownFile(len(data), _md5(data)), backoff=0)
    assert out.read_bytes() == data and not (tmp_path / "val2017.zip.part").exists()
    assert server.log == [{"path": "/zips/val2017.zip", "range": f"bytes={half}-", "status": 206,
                           "sent": len(data) - half}]


def test_server_ignoring_range_restarts_cleanly(server, tmp_path: Path) -> None:
    server.honour_range = False
    data = server.files["/zips/val2017.zip"]
    (tmp_path / "val2017.zip.part").write_bytes(b"x" * 100)  # not even the right bytes
    out = download_file(server.url + "/zips/val2017.zip", tmp_path / "val2017.zip", known=KnownFile(None, _md5(data)))
    assert out.read_bytes() == data and server.log[0]["status"] == 200


def test_dropped_connection_is_resumed(server, tmp_path: Path) -> None:
    data = server.files["/zips/val2017.zip"]
    server.cut_after, server.cut_times = 1000, 1
    out = download_file(server.url + "/zips/val2017.zip", tmp_path / "v.zip", known=KnownFile(None, _md5(data)),
                        retries=2, backoff=0)
    assert out.read_bytes() == data
    assert [e["range"] for e in server.log] == [None, "bytes=1000-"]


def test_retries_exhausted_keeps_part_for_next_time(server, tmp_path: Path) -> None:
    data = server.files["/zips/val2017.zip"]
    server.cut_after, server.cut_times = 500, 2
    with pytest.raises(HarnessError, match=r"/zips/val2017\.zip: download failed after 2 attempt.*v\.zip\.part"):
        download_file(server.url + "/zips/val2017.zip", tmp_path / "v.zip", retries=1, backoff=0)
    assert (tmp_path / "v.zip.part").read_bytes() == data[:1000]
    out = download_file(server.url + "/zips/val2017.zip", tmp_path / "v.zip", backoff=0)  # next call resumes
    assert out.read_bytes() == data and server.log[-1]["range"] == "bytes=1000-"


def test_complete_part_file_answered_416(server, tmp_path: Path) -> None:
    data = server.files["/zips/val2017.zip"]
    (tmp_path / "v.zip.part").write_bytes(data)
    out = download_file(server.url + "/zips/val2017.zip", tmp_path / "v.zip", known=KnownFile(len(data), _md5(data)))
    assert out.read_bytes() == data and server.log[0]["status"] == 416


def test_checksum_mismatch(server, tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match=r"v\.zip\.bad: md5 [0-9a-f]{32} does not match the known 0{32}"):
        download_file(server.url + "/zips/val2017.zip", tmp_path / "v.zip", known=KnownFile(None, ("md5", "0" * 32)))
    assert not (tmp_path / "v.zip").exists()


def test_size_mismatch(server, tmp_path: Path) -> None:
    size = len(server.files["/zips/val2017.zip"])
    with pytest.raises(HarnessError, match=rf"{size} bytes, expected {size + 1} for v\.zip"):
        download_file(server.url + "/zips/val2017.zip", tmp_path / "v.zip", known=KnownFile(size + 1))


def test_http_error_names_url(server, tmp_path: Path) -> None:
    with pytest.raises(HarnessError, match=r"/zips/test2099\.zip: HTTP 404"):
        download_coco(tmp_path, ["test2099"], base_url=server.url, known={})
    with pytest.raises(HarnessError, match="split 'bogus'"):
        download_coco(tmp_path, ["bogus"], base_url=server.url)


def test_unsafe_zip_member(tmp_path: Path) -> None:
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("../evil.txt", b"x")
    with pytest.raises(HarnessError, match="unsafe member path"):
        unpack_zip(bad, tmp_path / "out")
    (tmp_path / "notzip.zip").write_bytes(b"nope")
    with pytest.raises(HarnessError, match=r"notzip\.zip: not a valid zip"):
        unpack_zip(tmp_path / "notzip.zip", tmp_path / "out")
