"""Crash-safe writes: every output goes to a temporary name next to its target and is renamed into place.

A rename within one folder is atomic on POSIX and Windows (os.replace), so a reader (or a crash at any
moment) sees either the previous complete file or the new complete file, never a half-written one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator

from .errors import UserError


def _temp_sibling(path: Path) -> Path:
    # Same folder as the target (a rename across file systems is not atomic); the name keeps the
    # real suffix last because some writers (PIL, safetensors) pick the format from it.
    return path.with_name(f".{path.stem}.tmp-{uuid.uuid4().hex[:8]}{path.suffix}")


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call write(temp_path) and rename the result to path; the temp file is removed on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    try:
        write(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `path` (an older folder there is removed last).

    Folders cannot be swapped atomically in one call, so the old folder is first renamed aside: at every
    moment either the old or the new complete folder exists under a known name.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_writable(folder: str | os.PathLike) -> Path:
    """Create folder and prove a file can be written there, before any training time is spent."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output folder {str(folder)!r} cannot be written: {e.strerror or e}") from None
    return folder
