"""Crash-safe writes: every output goes to a temporary name next to its target and is renamed into place.

A rename within one folder is atomic on POSIX and Windows (os.replace), so a reader (or a crash at any
moment) sees either the previous complete file or the new complete file, never a half-written one.

A process killed mid-save (kill -9, power loss) leaves its hidden temporary behind. Temporary names carry
the writer's process id and machine (``.<name>.tmp-<pid>-<host hash><random>``), so a later run can tell
such leftovers from a save in progress: :func:`clean_stale_temporaries` removes only names of this pattern
whose writer is gone.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

from .errors import UserError


def _host_hash() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


def _tag() -> str:
    return f"{os.getpid()}-{_host_hash()}{uuid.uuid4().hex[:6]}"


def _temp_sibling(path: Path) -> Path:
    # Same folder as the target (a rename across file systems is not atomic); the name keeps the
    # real suffix last because some writers (PIL, safetensors) pick the format from it.
    return path.with_name(f".{path.stem}.tmp-{_tag()}{path.suffix}")


def _current_umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; it is put back at once
    os.umask(mask)
    return mask


def give_normal_mode(root: Path) -> None:
    """Files get the mode a new file normally gets (0666 less the umask, 0644 usually). safetensors'
    writer creates its files 0600, which hid a LoRA from a web UI running as another user."""
    mode = 0o666 & ~_current_umask()
    files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file() and not p.is_symlink()]
    for file in files:
        os.chmod(file, mode)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call write(temp_path) and rename the result to path; the temp file is removed on failure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path)
    try:
        write(str(tmp))
        give_normal_mode(tmp)
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
    tmp = path.with_name(f".{path.name}.tmp-{_tag()}")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    give_normal_mode(tmp)
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{_tag()}")
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


# .<target>.tmp-<pid>-<host><random>[suffix] (a file or folder being written) and the same with .old-
# (the previous folder, renamed aside for the moment of the swap)
_LEFTOVER = re.compile(r"^\.(?P<target>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)-(?P<host>[0-9a-f]{6})[0-9a-f]{6}"
                       r"(?P<suffix>\.[A-Za-z0-9]+)?$")
OTHER_HOST_STALE_S = 3600.0  # a save from another machine (shared disk) untouched this long is over


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists (another user's), or cannot tell: treat as alive, keep its files
        return True
    return True


def _last_touched(path: Path) -> float:
    times = [path.lstat().st_mtime]
    if path.is_dir():
        times += [child.lstat().st_mtime for child in path.iterdir()]
    return max(times)


def _writer_gone(match: re.Match, entry: Path, now: float) -> bool:
    if match["host"] == _host_hash():
        return not _process_alive(int(match["pid"]))
    return now - _last_touched(entry) > OTHER_HOST_STALE_S  # its process cannot be asked from here


def clean_stale_temporaries(folder: str | os.PathLike, now: float | None = None) -> list[str]:
    """Remove what interrupted saves left in `folder`; return one line per action, for the log.

    Only names of this module's pattern are touched, and only when their writer is gone: a process of
    this machine that no longer runs, or, for another machine on a shared disk, nothing changed for an
    hour. A previous folder renamed aside whose target is missing (a kill between the two renames of
    atomic_dir) is put back under its name instead of being removed.
    """
    folder = Path(folder)
    now = time.time() if now is None else now
    actions = []
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return actions
    for entry in entries:
        match = _LEFTOVER.match(entry.name)
        if not match:
            continue
        try:
            if not _writer_gone(match, entry, now):
                continue
            target = folder / (match["target"] + (match["suffix"] or ""))
            if match["kind"] == "old" and not target.exists():
                os.replace(entry, target)
                actions.append(f"restored {target} (a save was interrupted while replacing it)")
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            actions.append(f"removed {entry}, left by an interrupted save")
        except OSError:
            continue  # gone meanwhile, or not ours to remove: leave it
    return actions
