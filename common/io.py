"""Small file I/O that every package shares: atomic writes, folder swaps, hashing, strict JSON lines.

Readers never see half a file: writes go to a temporary name in the same folder and are renamed
(`os.replace` is atomic on POSIX). A finished folder replaces an old one without a moment where
neither exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common.errors import UserError


def write_atomic(path: str | os.PathLike, data: bytes | str, *, fsync: bool = False) -> Path:
    """Write `data` (str as UTF-8) to `path` through a temporary name; with `fsync`, durable first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_json(path: str | os.PathLike, obj: Any, *, indent: int = 1, fsync: bool = False) -> Path:
    """Atomic, sorted-key JSON with a final newline (non-JSON values written with str())."""
    text = json.dumps(obj, indent=indent, sort_keys=True, ensure_ascii=False, default=str) + "\n"
    return write_atomic(path, text, fsync=fsync)


def canonical_json(obj: object) -> bytes:
    """The bytes hashed for a JSON value: sorted keys, no spaces, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def replace_dir(new: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Put the finished folder `new` at `out_dir`; an existing one is moved aside and removed after.

    A kill at any point leaves either the old folder or the new one at out_dir (plus a dot-named folder
    beside it, removed by the next swap), never nothing.
    """
    new, out_dir = Path(new), Path(out_dir)
    old = out_dir.with_name(f".{out_dir.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(new, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    for stale in out_dir.parent.glob(f".{out_dir.name}.*"):  # temporaries of killed writers
        shutil.rmtree(stale, ignore_errors=True)
    return out_dir


def decode_utf8(data: bytes, path: str | os.PathLike, line_start: int = 0, line_no: int = 1) -> str:
    """Strict UTF-8; invalid bytes give one error naming the file, the byte offset and the line."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = line_no + data.count(b"\n", 0, e.start)
        raise UserError(
            f"{path}: invalid UTF-8 at byte {line_start + e.start} (line {line}): {data[e.start : e.start + 4]!r}"
        ) from None


def read_text(path: str | os.PathLike) -> str:
    """A file's text, strict UTF-8, with one clear error for a missing file or bad bytes."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    return decode_utf8(data, path)


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, object]]:
    """(line number, record) for each non-blank line of a JSON-lines file: strict UTF-8, split on
    '\n' only, and one error naming the file and line for a missing file, bad bytes or bad JSON."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    offset = 0
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            line = decode_utf8(raw, path, offset, line_no)
            offset += len(raw)
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
