"""Fetching the official COCO 2017 zips with resume, size/checksum verification and unpacking.

`download_coco(dest, splits=["val2017"])` fetches `<base>/zips/<split>.zip` and
`<base>/annotations/annotations_trainval<year>.zip` into `dest`, resuming a partial `<name>.part`
file with an HTTP Range request, checking the byte count against Content-Length (or Content-Range)
and the checksum when one is known (`KNOWN_FILES`), then unpacks them into the official layout
(`dest/<split>/…`, `dest/annotations/instances_<split>.json`). A finished unpack leaves a marker so a
second call does nothing. Library code prints nothing: pass `progress(description, done, total)`.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import socket
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from harness.errors import HarnessError

Progress = Callable[[str, int, int], None]

COCO_BASE_URL = "http://images.cocodataset.org"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class KnownFile:
    """What a published file should be: its byte size and/or a (algorithm, hex digest) checksum."""

    size: int | None = None
    checksum: tuple[str, str] | None = None


# Published md5 sums of the official COCO 2017 zips (as listed by torchvision-style loaders and the
# COCO download scripts); sizes where we have them. Verified when the file is downloaded.
KNOWN_FILES: dict[str, KnownFile] = {
    "train2017.zip": KnownFile(None, ("md5", "cced6f7f71b7629ddf16f17bbcfab6b2")),
    "val2017.zip": KnownFile(815585330, ("md5", "442b8da7639aecaf257c1dceb8ba8c80")),
    "test2017.zip": KnownFile(None, ("md5", "77ad2c53ac5d0aea611d422c0938fb35")),
    "annotations_trainval2017.zip": KnownFile(252907541, ("md5", "f4bbac642086de4f52a3fdda2de5fa2c")),
}

_RETRYABLE = (urllib.error.URLError, ConnectionError, TimeoutError, socket.timeout, http.client.HTTPException)


class _Incomplete(Exception):
    pass


def file_digest(path: Path, algorithm: str, progress: Progress | None = None) -> str:
    try:
        h = hashlib.new(algorithm)
    except ValueError:
        raise HarnessError(f"checksum algorithm {algorithm!r} is not known to hashlib") from None
    total = path.stat().st_size
    done = 0
    with path.open("rb") as fh:
        while block := fh.read(_CHUNK * 4):
            h.update(block)
            done += len(block)
            if progress:
                progress(f"verifying {path.name}", done, total)
    return h.hexdigest()


def _content_range_total(value: str | None) -> tuple[int | None, int | None]:
    """'bytes 100-199/1000' → (100, 1000); 'bytes */1000' → (None, 1000)."""
    if not value:
        return None, None
    m = re.match(r"bytes\s+(?:(\d+)-\d+|\*)/(\d+|\*)", value.strip())
    if not m:
        return None, None
    start = int(m.group(1)) if m.group(1) is not None else None
    total = int(m.group(2)) if m.group(2) != "*" else None
    return start, total


def _write_body(resp: http.client.HTTPResponse, part: Path, mode: str, have: int, total: int | None, label: str,
                progress: Progress | None) -> None:
    """Stream the response body into `part` ("ab" appends after `have` bytes, "wb" starts over)."""
    with part.open(mode) as fh:
        done = have
        if progress:
            progress(f"downloading {label}", done, total or 0)
        while block := resp.read(_CHUNK):
            fh.write(block)
            done += len(block)
            if progress:
                progress(f"downloading {label}", done, total or 0)


def _verify_part(part: Path, dest: Path, total: int | None, known: KnownFile | None,
                 progress: Progress | None) -> None:
    """Check the finished part file against the server's total and `known`'s size and checksum.

    A part shorter or longer than the server announced is deleted; one with the wrong checksum is
    moved to `<dest>.bad`.
    """
    label = dest.name
    size = part.stat().st_size
    if total is not None and size != total:
        part.unlink(missing_ok=True)
        raise HarnessError(f"{part}: {size} bytes, but the server announced {total}; deleted, run again")
    if known and known.size is not None and size != known.size:
        raise HarnessError(f"{part}: {size} bytes, expected {known.size} for {label} (wrong file or mirror?)")
    if known and known.checksum:
        algorithm, expected = known.checksum
        actual = file_digest(part, algorithm, progress)
        if actual.lower() != expected.lower():
            bad = part.with_name(dest.name + ".bad")
            os.replace(part, bad)
            raise HarnessError(f"{bad}: {algorithm} {actual} does not match the known {expected} for {label}")


def download_file(
    url: str,
    dest: str | Path,
    *,
    known: KnownFile | None = None,
    progress: Progress | None = None,
    retries: int = 3,
    timeout: float = 60.0,
    backoff: float = 1.0,
) -> Path:
    """Download `url` to `dest` through `dest.part`, resuming the part file with an HTTP Range request.

    The byte count must equal the server's Content-Length / Content-Range total (and `known.size`);
    the checksum is verified when `known.checksum` is given. Connection drops are retried
    `retries` times, each resuming where the last stopped. Raises `HarnessError` naming the URL or
    file on an HTTP error, a size or checksum mismatch, or when the retries run out (the part file
    is kept so the next call resumes).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    label = dest.name
    total: int | None = None
    for attempt in range(retries + 1):
        have = part.stat().st_size if part.exists() else 0
        headers = {"User-Agent": "dcn-harness", "Accept-Encoding": "identity"}
        if have:
            headers["Range"] = f"bytes={have}-"
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
                if resp.status == 206:
                    start, total = _content_range_total(resp.headers.get("Content-Range"))
                    if start != have:  # the server resumed somewhere else: start over
                        have, mode = 0, "wb"
                        part.unlink(missing_ok=True)
                        continue
                    mode = "ab"
                else:  # 200: the whole file (server ignores Range, or no part file)
                    length = resp.headers.get("Content-Length")
                    total = int(length) if length and length.isdigit() else None
                    have, mode = 0, "wb"
                _write_body(resp, part, mode, have, total, label, progress)
            size = part.stat().st_size
            if total is not None and size < total:
                raise _Incomplete(f"got {size} of {total} bytes")
            break
        except urllib.error.HTTPError as exc:
            if exc.code == 416 and have:  # the part file already covers the whole file (or more)
                _, total = _content_range_total(exc.headers.get("Content-Range") if exc.headers else None)
                if total is not None and have == total:
                    break
                part.unlink(missing_ok=True)
                continue
            raise HarnessError(f"{url}: HTTP {exc.code} {exc.reason}") from None
        except (_Incomplete, *_RETRYABLE) as exc:
            if attempt >= retries:
                raise HarnessError(
                    f"{url}: download failed after {retries + 1} attempt(s) ({exc}); run again to resume {part}"
                ) from None
            time.sleep(min(30.0, backoff * 2**attempt))
    else:
        raise HarnessError(f"{url}: the server did not honour the resume request; delete {part} and retry")

    _verify_part(part, dest, total, known, progress)
    os.replace(part, dest)
    return dest


def _safe_members(zf: zipfile.ZipFile, dest: Path, select: Callable[[str], bool] | None) -> list[zipfile.ZipInfo]:
    root = dest.resolve()
    members = []
    for info in zf.infolist():
        name = info.filename
        if select is not None and not select(name):
            continue
        pure = PurePosixPath(name)
        if pure.is_absolute() or ".." in pure.parts or not (root / name).resolve().is_relative_to(root):
            raise HarnessError(f"{zf.filename}: unsafe member path {name!r}; not unpacking")
        members.append(info)
    return members


def unpack_zip(zip_path: str | Path, dest: str | Path, select: Callable[[str], bool] | None = None,
               progress: Progress | None = None) -> list[str]:
    """Extract the (selected) members of `zip_path` under `dest`; returns their names."""
    zip_path, dest = Path(zip_path), Path(dest)
    try:
        with zipfile.ZipFile(zip_path) as zf:
            members = _safe_members(zf, dest, select)
            for i, info in enumerate(members):
                zf.extract(info, dest)
                if progress and (i % 200 == 0 or i == len(members) - 1):
                    progress(f"unpacking {zip_path.name}", i + 1, len(members))
    except zipfile.BadZipFile as exc:
        raise HarnessError(f"{zip_path}: not a valid zip file ({exc}); delete it and run again") from None
    return [m.filename for m in members]


@dataclass
class DownloadResult:
    dest: Path
    splits: list[str]
    downloaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def coco_files(split: str, annotations: bool = True) -> list[tuple[str, str]]:
    """(URL path under the base URL, file name) of the zips that make up `split`."""
    m = re.fullmatch(r"(train|val|test|unlabeled)(\d{4})", split)
    if not m:
        raise HarnessError(f"split {split!r}: expected a COCO split name such as val2017 or train2017")
    files = [(f"zips/{split}.zip", f"{split}.zip")]
    if annotations and m.group(1) in ("train", "val"):
        name = f"annotations_trainval{m.group(2)}.zip"
        files.append((f"annotations/{name}", name))
    return files


def download_coco(
    dest: str | Path,
    splits: Sequence[str] = ("val2017",),
    *,
    base_url: str = COCO_BASE_URL,
    annotations: bool = True,
    known: dict[str, KnownFile] | None = None,
    keep_zips: bool = False,
    progress: Progress | None = None,
    retries: int = 3,
    timeout: float = 60.0,
    backoff: float = 1.0,
) -> DownloadResult:
    """Download and unpack COCO `splits` (and their instances annotations) into `dest`.

    `known` maps file names to expected sizes/checksums (default `KNOWN_FILES`; pass {} to verify
    only against the server's Content-Length). Zips are deleted after unpacking unless `keep_zips`.
    """
    dest = Path(dest)
    table = KNOWN_FILES if known is None else known
    result = DownloadResult(dest, list(splits))
    wanted: dict[str, str] = {}
    for split in splits:
        for rel, name in coco_files(split, annotations):
            wanted.setdefault(name, rel)
    dest.mkdir(parents=True, exist_ok=True)
    for name, rel in wanted.items():
        marker = dest / f".{name}.unpacked"
        if marker.is_file():
            result.skipped.append(name)
            continue
        zip_path = dest / name
        if not zip_path.is_file():
            download_file(f"{base_url.rstrip('/')}/{rel}", zip_path, known=table.get(name), progress=progress,
                          retries=retries, timeout=timeout, backoff=backoff)
            result.downloaded.append(name)
        select = (lambda n: n.startswith("annotations/instances_")) if name.startswith("annotations_") else None
        names = unpack_zip(zip_path, dest, select, progress)
        marker.write_text(json.dumps({"zip": name, "members": len(names), "url": f"{base_url.rstrip('/')}/{rel}"}))
        if not keep_zips:
            with contextlib.suppress(OSError):
                zip_path.unlink()
    for split in splits:
        if not (dest / split).is_dir():
            raise HarnessError(f"{dest / split}: missing after unpacking {split}.zip (not an official COCO zip?)")
        if annotations and not split.startswith(("test", "unlabeled")):
            ann = dest / "annotations" / f"instances_{split}.json"
            if not ann.is_file():
                raise HarnessError(f"{ann}: missing after unpacking the annotations zip")
    return result
