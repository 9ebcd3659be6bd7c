"""kohya-layout dataset checks and the step-determined batch order."""

import os
import re

import pytest
import torch

from builtin_fixtures import build_dataset
from library.builtin.atomic import atomic_dir, atomic_write, check_writable
from library.builtin.data import BatchOrder, load_image, scan_dataset
from library.builtin.errors import UserError


def test_repeats_and_captions(tmp_path):
    root = build_dataset(tmp_path / "d", n_images=3, repeats=4)
    examples = scan_dataset(str(root), ".txt")
    assert len(examples) == 12
    assert examples[0].caption == "a photo of zkz number 0"


def test_missing_and_empty_dataset(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        scan_dataset(str(tmp_path / "nope"), ".txt")
    (tmp_path / "empty" / "images").mkdir(parents=True)  # no <repeats>_ prefix: kohya ignores it
    with pytest.raises(UserError, match="holds no training images.*<repeats>_<name>.*found: images"):
        scan_dataset(str(tmp_path / "empty"), ".txt")


def test_undecodable_image_is_named(tmp_path):
    root = build_dataset(tmp_path / "d", n_images=2)
    bad = root / "2_toy" / "img_1.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(UserError, match="img_1.png.*cannot be decoded"):
        scan_dataset(str(root), ".txt")


def test_missing_caption_warns_in_one_plain_line_and_uses_folder_name(tmp_path, capsys, recwarn):
    root = build_dataset(tmp_path / "d", n_images=2, repeats=1, name="my token")
    os.remove(root / "1_my token" / "img_1.txt")
    examples = scan_dataset(str(root), ".txt")
    assert [e.caption for e in examples] == ["a photo of zkz number 0", "my token"]
    err = capsys.readouterr().err
    # a message for the user, not a Python UserWarning with a source line under it
    assert re.fullmatch(r"warning: 1 image\(s\) have no caption file .*img_1\.png.*--caption_extension\.\n", err)
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


def test_load_image_crops_to_size_and_flips(tmp_path):
    root = build_dataset(tmp_path / "d", n_images=1, repeats=1)
    image = root / "1_toy" / "img_0.png"
    a = load_image(image, (16, 8), flip=False)
    b = load_image(image, (16, 8), flip=True)
    assert a.shape == (3, 8, 16) and a.min() >= -1 and a.max() <= 1
    assert torch.equal(a.flip(-1), b)


@pytest.mark.parametrize("processes", [1, 2, 3])
def test_batch_order_covers_each_epoch_and_splits_over_processes(processes):
    order = BatchOrder(n_examples=10, batch_size=2, num_processes=processes, seed=3, flip=True)
    epoch0 = [item for g in range(order.batches_per_epoch) for r in range(processes) for item in order.batch(g, r)]
    assert {i for i, _, _ in epoch0} == set(range(10))  # every example at least once (padding wraps)
    slots = [s for _, _, s in epoch0]
    assert slots == list(range(len(slots)))  # each position of the run has its own slot
    again = BatchOrder(10, 2, processes, seed=3, flip=True)
    assert again.batch(order.batches_per_epoch + 1, 0) == order.batch(order.batches_per_epoch + 1, 0)
    assert BatchOrder(10, 2, processes, seed=4, flip=True).batch(0, 0) != order.batch(0, 0)


def test_split_over_processes_keeps_the_examples_of_a_global_batch():
    # 2 processes x batch 1 must see what 1 process x batch 2 sees, with the same slots (same noise)
    one = BatchOrder(8, 2, 1, seed=5, flip=False)
    two = BatchOrder(8, 1, 2, seed=5, flip=False)
    for g in range(8):
        assert one.batch(g, 0) == two.batch(g, 0) + two.batch(g, 1)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "x.bin"
    target.write_bytes(b"old")

    def crash(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, crash)
    assert target.read_bytes() == b"old" and os.listdir(tmp_path) == ["x.bin"]
    atomic_write(target, lambda tmp: open(tmp, "wb").write(b"new"))
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["x.bin"]


def test_atomic_dir_replaces_whole_folder(tmp_path):
    target = tmp_path / "state"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(ValueError):
        with atomic_dir(target) as tmp:
            (tmp / "a").write_text("2")
            raise ValueError("crash while saving")
    assert (target / "a").read_text() == "1" and os.listdir(tmp_path) == ["state"]
    with atomic_dir(target) as tmp:
        (tmp / "b").write_text("3")
    assert sorted(os.listdir(target)) == ["b"] and os.listdir(tmp_path) == ["state"]


def test_unwritable_output_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("I am a file")
    with pytest.raises(UserError, match="output folder.*cannot be written"):
        check_writable(blocker / "out")
