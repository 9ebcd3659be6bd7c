"""Model files and training state on disk, every write atomic (see atomic.py).

State folder (kohya's names, so the layout is familiar): model.safetensors (the trained weights only),
optimizer.bin, scheduler.bin (torch.save of their state_dict), train_state.json (step, epoch, seed, loss
history). No RNG state is needed: every random draw of a step is seeded from (seed, step), see trainer.py.
"""

from __future__ import annotations

import json
from pathlib import Path

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


def load_weights(path: str) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"weights file {path!r} does not exist")
    if p.suffix == ".safetensors":
        return load_file(str(p))
    return torch.load(str(p), map_location="cpu", weights_only=True)


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
    weights = load_file(str(root / STATE_WEIGHTS))
    # weights_only: a state folder is data, never code (accelerate loads it the same way)
    optimizer = torch.load(root / STATE_OPTIMIZER, map_location="cpu", weights_only=True)
    scheduler = torch.load(root / STATE_SCHEDULER, map_location="cpu", weights_only=True)
    train_state = json.loads((root / STATE_JSON).read_text(encoding="utf-8"))
    return weights, optimizer, scheduler, train_state
