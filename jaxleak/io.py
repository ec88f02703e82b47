"""Atomic file output: nothing jaxleak writes is ever left truncated."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import tempfile
from typing import Iterator, Sequence


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path in the target's folder; on success rename it onto ``path``.

    The rename is atomic on POSIX, so readers see the old file or the new one,
    never a partial one; on error the temporary file is removed.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def run_directory(out: str, *, resume: bool, cleanup: tuple[type[BaseException], ...]) -> Iterator[str]:
    """Create ``out`` (with ``parts/``) for a run or study; if it was created here, remove it on ``cleanup`` errors.

    A failed fresh run leaves nothing behind; a resumed run keeps everything
    it had (its finished parts are what ``--resume`` continues from).
    """
    created = not os.path.exists(out)
    try:
        os.makedirs(os.path.join(out, "parts"), exist_ok=True)
        yield out
    except cleanup:
        if created and not resume:
            shutil.rmtree(out, ignore_errors=True)
        raise


def write_bytes(path: str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str, obj) -> None:
    """JSON with sorted-free, stable formatting (NaN is not valid JSON: pass None instead)."""
    write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    write_text(path, buf.getvalue())


def append_jsonl(path: str, obj) -> None:
    """Append one JSON line; a line is written in one call, then flushed and synced."""
    line = json.dumps(obj, allow_nan=False) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
