#!/usr/bin/env python
"""Regenerate the README's quick-start pictures from this version, with a stamp of what made them.

    python tools/make_readme_pictures.py          # runs the quick start (1-2 min on a 2-core CPU)
    python tools/make_readme_pictures.py --check  # only compares the stamp with this checkout

Runs the README's quick start (``python train_network_patch.py --preset lora``) in a temporary
output folder and copies its pictures into ``docs/``: ``quickstart_grid.png`` (samples before /
after), ``quickstart_loss.png`` (loss and learning rates) and ``quickstart_lr_mask.png`` (what the
mask learned, with the schedule's factor apart). ``docs/pictures_stamp.json`` records the run's
settings, its banner line, the pictures' hashes and a fingerprint of the source files the run
depends on (``SOURCES``): the optimizer, the presets, the launcher, the built-in trainer and its
shipped model. ``tests/test_readme_pictures.py`` recomputes that fingerprint, so an edit to any of
these files fails the test until this command is run again; edits elsewhere (README, tests,
benchmarks, comments in other tools) leave the pictures valid.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
STAMP = DOCS / "pictures_stamp.json"
COMMAND = ["train_network_patch.py", "--preset", "lora"]  # the README's quick start, as written there
PRESET = "lora"
# run output -> committed picture
PICTURES = {
    "sample/last_grid.png": "quickstart_grid.png",
    "last_loss.png": "quickstart_loss.png",
    "last_lr_mask.png": "quickstart_lr_mask.png",
}
# What the quick start's pictures depend on: files (or folders, every file below them) under ROOT.
SOURCES = (
    "train_network_patch.py",
    "library/automagic_sinkgd.py",
    "library/optimizer_factory.py",
    "library/presets.py",
    "library/lr_mask_view.py",
    "library/builtin",
    f"configs/{PRESET}.toml",
)
TEXT_SUFFIXES = (".py", ".toml", ".json", ".txt", ".md")


def source_files(root: Path = ROOT) -> list[Path]:
    files = []
    for entry in SOURCES:
        path = root / entry
        if path.is_dir():
            files += [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                      and not p.name.startswith(".") and p.suffix != ".pyc"]  # caches, editors' files
        elif path.is_file():
            files.append(path)
    return sorted(files)


def file_digest(path: Path) -> str:
    data = path.read_bytes()
    if path.suffix in TEXT_SUFFIXES:  # a checkout with CRLF line ends holds the same source
        data = data.replace(b"\r\n", b"\n")
    return hashlib.sha256(data).hexdigest()


def source_digests(root: Path = ROOT) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): file_digest(p) for p in source_files(root)}


def fingerprint(digests: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest()


def run_settings() -> dict:
    """What the quick start runs with, from the code as it is now (cheap: no model is loaded)."""
    sys.path.insert(0, str(ROOT))
    from library.builtin.trainer import QUICK_START
    from library.presets import load_preset

    return {"command": ["python", *COMMAND], "quick_start_defaults": dict(QUICK_START),
            "preset": {PRESET: load_preset(PRESET)}}


def package_version() -> str:
    match = re.search(r'version="([^"]+)"', (ROOT / "setup.py").read_text(encoding="utf-8"))
    return match.group(1) if match else "unknown"


def stale_reasons(stamp: dict) -> list[str]:
    """Why the committed pictures do not show this version (empty when they do)."""
    reasons = []
    now = source_digests()
    before = stamp.get("sources", {})
    changed = sorted(k for k in now.keys() | before.keys() if now.get(k) != before.get(k))
    if changed or stamp.get("fingerprint") != fingerprint(now):
        reasons.append("source changed since the pictures were made: " + ", ".join(changed[:8])
                       + (f" and {len(changed) - 8} more" if len(changed) > 8 else ""))
    if stamp.get("settings") != json.loads(json.dumps(run_settings())):
        reasons.append("the quick start's settings changed (command, defaults or the lora preset)")
    for name, digest in stamp.get("pictures", {}).items():
        path = DOCS / name
        if not path.is_file() or file_digest(path) != digest:
            reasons.append(f"docs/{name} is not the picture the stamp describes")
    missing = set(PICTURES.values()) - set(stamp.get("pictures", {}))
    if missing:
        reasons.append(f"the stamp lists no {', '.join(sorted(missing))}")
    return reasons


def make(keep: Path | None = None) -> dict:
    out = Path(tempfile.mkdtemp(prefix="quickstart_")) if keep is None else keep
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [sys.executable, *COMMAND, "--output_dir", str(out)]
    print("running:", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:] + done.stderr[-4000:])
        raise SystemExit(f"the quick start failed (exit {done.returncode})")
    banner = next((line for line in done.stdout.splitlines() if line.startswith("built-in backend:")), "")
    banner = banner.replace(str(out), "<output_dir>").replace(str(Path.home()), "~")
    pictures = {}
    for produced, name in PICTURES.items():
        shutil.copyfile(out / produced, DOCS / name)
        pictures[name] = file_digest(DOCS / name)
    digests = source_digests()
    stamp = {
        "made_by": "python tools/make_readme_pictures.py",
        "settings": run_settings(),
        "banner": banner,
        "pictures": pictures,
        "fingerprint": fingerprint(digests),
        "sources": digests,
        "package_version": package_version(),
        "made_with": {"python": platform.python_version(), "torch": _version("torch"),
                      "diffusers": _version("diffusers"), "machine": f"{platform.machine()}, {os.cpu_count()} cores"},
    }
    STAMP.write_text(json.dumps(stamp, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    if keep is None:
        shutil.rmtree(out, ignore_errors=True)
    return stamp


def _version(package: str) -> str:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # noqa: BLE001 - recorded for information only
        return "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="only say whether the committed pictures match this version")
    p.add_argument("--keep", type=Path, default=None, help="run the quick start into this folder and keep it")
    a = p.parse_args(argv)
    if a.check:
        if not STAMP.is_file():
            print(f"no {STAMP.relative_to(ROOT)}: run python tools/make_readme_pictures.py")
            return 1
        reasons = stale_reasons(json.loads(STAMP.read_text(encoding="utf-8")))
        print("\n".join(reasons) if reasons else "the pictures match this version")
        return 1 if reasons else 0
    stamp = make(a.keep)
    print(f"wrote {', '.join('docs/' + n for n in stamp['pictures'])} and {STAMP.relative_to(ROOT)}")
    print(stamp["banner"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
