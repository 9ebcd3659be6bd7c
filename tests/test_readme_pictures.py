"""The README's quick-start pictures show this version: docs/pictures_stamp.json, written by
tools/make_readme_pictures.py with the pictures, must match what the current code would run (its source
fingerprint and settings, recomputed here without training). When this fails, run
`python tools/make_readme_pictures.py` and commit docs/."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("make_readme_pictures", ROOT / "tools" / "make_readme_pictures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tool():
    return _tool()


def test_committed_pictures_are_from_this_version(tool):
    stamp = json.loads(tool.STAMP.read_text(encoding="utf-8"))
    reasons = tool.stale_reasons(stamp)
    assert not reasons, ("the README's pictures are from an older version (" + "; ".join(reasons)
                         + "): run `python tools/make_readme_pictures.py` and commit docs/")


def test_the_fingerprint_covers_what_the_run_depends_on_and_nothing_else(tool):
    files = tool.source_digests()
    for needed in ("library/automagic_sinkgd.py", "configs/lora.toml", "library/presets.py", "train_network_patch.py",
                   "library/builtin/trainer.py", "library/lr_mask_view.py"):
        assert needed in files
    assert any(name.startswith("library/builtin/assets/") for name in files)  # the shipped model
    assert not [name for name in files if name.startswith(("tests/", "docs/", "benchmarks/")) or name == "README.md"]


def test_an_older_stamp_is_caught_and_the_changed_file_named(tool):
    stamp = json.loads(tool.STAMP.read_text(encoding="utf-8"))
    stamp["sources"]["library/automagic_sinkgd.py"] = "0" * 64  # as if the optimizer changed since
    reasons = tool.stale_reasons(stamp)
    assert reasons and "library/automagic_sinkgd.py" in reasons[0]
    stamp = json.loads(tool.STAMP.read_text(encoding="utf-8"))
    stamp["settings"]["preset"]["lora"]["learning_rate"] = 1.0  # as if the preset's lr changed
    assert any("settings changed" in r for r in tool.stale_reasons(stamp))
    stamp = json.loads(tool.STAMP.read_text(encoding="utf-8"))
    stamp["pictures"]["quickstart_grid.png"] = "0" * 64  # a picture replaced by hand
    assert any("quickstart_grid.png" in r for r in tool.stale_reasons(stamp))


def test_line_endings_do_not_change_the_fingerprint(tool, tmp_path):
    unix, windows = tmp_path / "a.py", tmp_path / "b.py"
    unix.write_bytes(b"x = 1\ny = 2\n")
    windows.write_bytes(b"x = 1\r\ny = 2\r\n")
    assert tool.file_digest(unix) == tool.file_digest(windows)
