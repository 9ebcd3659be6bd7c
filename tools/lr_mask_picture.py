#!/usr/bin/env python
"""Draw what Automagic_Sinkgd's mask learned, per layer in model order, and the schedule's factor apart.

    python tools/lr_mask_picture.py OUTPUT-state/ [--out mask.png] [--title TEXT] [--table]

Reads ``optimizer.bin`` from a state folder written by kohya's ``--save_state`` or by the
built-in backend (``<output_name>-state/``); layer names come from a ``*.safetensors`` beside it
whose tensors fit the optimizer's (kohya's LoRA state and the built-in backend's do), else the
layers are labelled by param group and tensor index. Writes a PNG (default: the folder's name
+ ``_lr_mask.png`` next to it) with, per layer, the learned mask (median of its elements, the
5-95% range and min-max) and below it the post-warm-up decay factor (0 where a preset has
decayed to zero, which is why the mask is drawn apart from it); ``--table`` prints the numbers,
with the effective rate's median (mask x ALLoRA x VRAdam x decay).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from library.lr_mask_view import draw, layers_from_state, load_state_folder, table  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("state", help="a --save_state folder (or its optimizer.bin)")
    p.add_argument("--out", default=None, help="PNG to write (default: <state folder>_lr_mask.png beside it)")
    p.add_argument("--title", default=None)
    p.add_argument("--table", action="store_true", help="print the per-layer numbers too")
    a = p.parse_args(argv)
    state = Path(a.state)
    try:
        state_dict, names = load_state_folder(state)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    folder = state if state.is_dir() else state.parent
    out = Path(a.out) if a.out else folder.with_name(folder.name + "_lr_mask.png")
    if names is None:
        print("note: no weights file beside the state fits its tensors; layers are labelled by group and index",
              file=sys.stderr)
    layers = layers_from_state(state_dict, names)
    draw(layers, out, a.title or f"{folder.name}: learned lr mask per layer")
    if a.table:
        print(table(layers))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
