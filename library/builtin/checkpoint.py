"""Model files and training state on disk, every write atomic (see atomic.py).

State folder (kohya's names, so the layout is familiar): model.safetensors (the trained weights only),
optimizer.bin, scheduler.bin (torch.save of their state_dict), train_state.json (step, epoch, seed, loss
history). No RNG state is needed: every random draw of a step is seeded from (seed, step), see trainer.py.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_dir, atomic_write
from .errors import UserError

STATE_WEIGHTS = "model.safetensors"
STATE_OPTIMIZER = "optimizer.bin"
STATE_SCHEDULER = "scheduler.bin"
STATE_JSON = "train_state.json"
SAVE_DTYPES = {None: None, "float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def save_weights(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> Path:
    """.safetensors with string metadata, or torch.save for kohya's ckpt/pt choice (no metadata there)."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    if path.suffix == ".safetensors":
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return atomic_write(path, lambda tmp: torch.save(tensors, tmp))


def _read(path: Path, what: str, reader: Callable[[Path], Any]) -> Any:
    """reader(path), or one line naming the file when it is truncated, damaged or not that kind of file.

    The readers' own messages are not passed on: torch's unpickler, for one, suggests
    weights_only=False for a foreign file, which would run whatever code the file holds.
    """
    try:
        return reader(path)
    except (PermissionError, IsADirectoryError, FileNotFoundError) as e:
        raise UserError(f"{what} {str(path)!r} cannot be read: {e.strerror or e}") from None
    except Exception as e:  # noqa: BLE001 - zip, pickle, safetensors and JSON readers raise their own types
        raise UserError(f"{what} {str(path)!r} is damaged, truncated or not such a file ({type(e).__name__}); "
                        "use an earlier copy or start without it") from None


def load_weights(path: str) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"weights file {path!r} does not exist")
    if p.suffix == ".safetensors":
        return _read(p, "weights file", lambda f: load_file(str(f)))
    return _read(p, "weights file", lambda f: torch.load(str(f), map_location="cpu", weights_only=True))


def write_error(target: Path, error: OSError) -> UserError:
    """A failed save as one line: which output, why, and that what was there before is still there."""
    reason = "the disk is full" if error.errno == errno.ENOSPC else (error.strerror or str(error))
    return UserError(f"cannot save {target}: {reason}; training stopped, earlier outputs (and any previous "
                     f"{target.name}) are kept as they were")


def save_state(folder: Path, weights: dict[str, torch.Tensor], optimizer, scheduler, train_state: dict) -> Path:
    with atomic_dir(folder) as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in weights.items()}, str(tmp / STATE_WEIGHTS))
        torch.save(optimizer.state_dict(), tmp / STATE_OPTIMIZER)
        torch.save(scheduler.state_dict(), tmp / STATE_SCHEDULER)
        (tmp / STATE_JSON).write_text(json.dumps(train_state, indent=1), encoding="utf-8")
    return folder


def read_state(folder: str) -> tuple[dict[str, torch.Tensor], dict, dict, dict]:
    """(weights, optimizer state_dict, scheduler state_dict, train_state), with a clear error if incomplete."""
    root = Path(folder)
    missing = [n for n in (STATE_WEIGHTS, STATE_OPTIMIZER, STATE_SCHEDULER, STATE_JSON) if not (root / n).is_file()]
    if missing:
        raise UserError(f"--resume {folder!r} is not a complete state folder (missing {', '.join(missing)}); "
                        "it is written by --save_state")
    what = f"--resume {folder}:"
    weights = _read(root / STATE_WEIGHTS, what, lambda f: load_file(str(f)))

    def torch_data(f: Path):  # weights_only: a state folder is data, never code (accelerate loads it the same way)
        loaded = torch.load(f, map_location="cpu", weights_only=True)
        if not isinstance(loaded, dict) or "state" not in loaded and f.name == STATE_OPTIMIZER:
            raise ValueError("not a state_dict")
        return loaded

    optimizer = _read(root / STATE_OPTIMIZER, what, torch_data)
    scheduler = _read(root / STATE_SCHEDULER, what, torch_data)
    train_state = _read(root / STATE_JSON, what, lambda f: json.loads(f.read_text(encoding="utf-8")))
    if not isinstance(train_state, dict) or not isinstance(train_state.get("current_step"), int):
        raise UserError(f"{what} {str(root / STATE_JSON)!r} has no current_step: not a state written by --save_state")
    return weights, optimizer, scheduler, train_state
