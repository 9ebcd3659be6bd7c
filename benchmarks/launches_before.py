#!/usr/bin/env python
"""Launches per step for an older version of the optimizer: the "before" column of docs/gpu.md's
launch table, counted by this repository's counters (``benchmarks/speed.py``).

Run it from a checkout of that version (its ``library/`` is imported, this repository's
``benchmarks/speed.py`` counts), on the meta device (shapes only, no memory)::

    git worktree add /tmp/before e315bf6^          # the version before the GPU-readiness change
    cd /tmp/before && python /path/to/this/repo/benchmarks/launches_before.py --json before.json

That version took the CPU's eager chunk sizes on a GPU too, so no GPU configuration is applied;
its fused rows run the host code with the kernels dry (``speed.dry_fused_kernels``). The SDXL full
fine-tune is counted on the meta device as dispatched ops (``speed.count_dispatched``), the other
sets on CPU as the profiler's leaves (``speed.count_launches``), as ``speed.py --launches-only``
counts them.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path.cwd()))  # the checkout being measured, before speed.py puts this one first
import library.automagic_sinkgd  # noqa: E402,F401
import library.automagic_sinkgd_kernels  # noqa: E402,F401

_spec = importlib.util.spec_from_file_location("speed", Path(__file__).resolve().parent / "speed.py")
speed = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(speed)

import torch  # noqa: E402

from library.automagic_sinkgd import Automagic_Sinkgd  # noqa: E402

ROWS = (
    ("Automagic warm-up", dict(warmup_steps=10**6), torch.float32, False),
    ("Automagic post-warm-up", dict(warmup_steps=2, orthograd=True), torch.float32, False),
    ("Automagic warm-up (bf16 weights, bf16 state)", dict(warmup_steps=10**6, state_precision="bf16"),
     torch.bfloat16, False),
    ("Automagic post-warm-up (bf16 weights, bf16 state)",
     dict(warmup_steps=2, orthograd=True, state_precision="bf16"), torch.bfloat16, False),
    ("Automagic warm-up (fused)", dict(warmup_steps=10**6), torch.float32, True),
    ("Automagic warm-up (fused, bf16 weights, bf16 state)", dict(warmup_steps=10**6, state_precision="bf16"),
     torch.bfloat16, True),
)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--sets", nargs="+", default=["sdxl_full"], choices=sorted(speed.SETS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name in args.sets:
        device = "meta" if name in speed.META_SETS else "cpu"
        shapes = speed.SETS[name]()
        common = dict(lr=5e-5, min_lr=1e-6, max_lr=1e-3, full_finetune=name in speed.FULL_SETS)
        counted = dict(counted="dispatched ops") if device == "meta" else {}
        for label, settings, dtype, fused in ROWS:
            with speed.dry_fused_kernels() if fused else contextlib.nullcontext():
                optimizer = Automagic_Sinkgd(speed.make_params(shapes, 0, dtype=dtype, device=device),
                                             fused=fused or None, **common, **settings)
                for _ in range(4):
                    optimizer.step()
                rows.append(dict(set=name, optimizer=label, launches=speed.count_step(optimizer, device), **counted))
            print(f"| {name} | {label} | {rows[-1]['launches']} |", flush=True)
    if args.json:
        import subprocess
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        Path(args.json).write_text(json.dumps(dict(library_commit=commit or "?", machine=speed.platform.machine(),
                                                   torch=torch.__version__, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
