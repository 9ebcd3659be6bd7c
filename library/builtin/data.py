"""kohya's DreamBooth-style dataset layout, checked up front, and a batch order that depends only on the step.

Layout: <train_data_dir>/<repeats>_<name>/<image> with <image stem><caption_extension> beside it.
An image without a caption file gets the folder's <name> as caption (kohya's "class token" rule), with a
warning that names the images. Every image is decoded once before training, so a broken file stops the run
before any time is spent, naming the file.

The order of examples is a pure function of (seed, epoch): a resumed run, or another process of a
multi-process run, computes the same order without any saved sampler state.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image, UnidentifiedImageError

from .errors import UserError
from .errors import warn as _warn_user  # a parameter below is named warn

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_FOLDER = re.compile(r"^(\d+)_(.+)$")


@dataclass(frozen=True)
class Example:
    image: Path
    caption: str


def _read_caption(path: Path) -> str:
    # kohya reads the first line of the caption file
    text = path.read_text(encoding="utf-8").strip()
    return text.splitlines()[0].strip() if text else ""


def _decode_problem(path: Path) -> str | None:
    """None when the image decodes, else why not."""
    try:
        with Image.open(path) as im:
            im.load()
    except (UnidentifiedImageError, OSError, ValueError) as e:
        return str(e)
    return None


def _undecodable_error(bad: list[tuple[Path, str]]) -> UserError:
    """Every broken image of the dataset in one message, so one run finds them all."""
    if len(bad) == 1:
        return UserError(f"image {str(bad[0][0])!r} cannot be decoded: {bad[0][1]}")
    shown = "; ".join(f"{str(p)!r} ({why})" for p, why in bad[:20])
    more = f"; and {len(bad) - 20} more" if len(bad) > 20 else ""
    return UserError(f"{len(bad)} images cannot be decoded: {shown}{more}. Replace or remove them")


def scan_dataset(train_data_dir: str, caption_extension: str,
                 warn: Callable[[str], None] = _warn_user) -> list[Example]:
    """All examples with repeats applied (kohya's epoch = every image `repeats` times).

    Problems that do not stop the run (images without captions) go to `warn` as plain lines."""
    root = Path(train_data_dir)
    if not root.is_dir():
        raise UserError(f"--train_data_dir {train_data_dir!r} does not exist or is not a folder")
    if not caption_extension.startswith("."):
        caption_extension = "." + caption_extension
    examples: list[Example] = []
    uncaptioned: list[str] = []
    undecodable: list[tuple[Path, str]] = []
    folders = sorted(d for d in root.iterdir() if d.is_dir() and _FOLDER.match(d.name))
    for folder in folders:
        repeats_text, class_token = _FOLDER.match(folder.name).groups()
        repeats = int(repeats_text)
        images = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file())
        for image in images:
            problem = _decode_problem(image)
            if problem is not None:
                undecodable.append((image, problem))
                continue
            caption_file = image.with_suffix(caption_extension)
            if caption_file.is_file():
                caption = _read_caption(caption_file)
            else:
                uncaptioned.append(str(image))
                caption = class_token
            examples.extend(Example(image, caption) for _ in range(repeats))
    if undecodable:
        raise _undecodable_error(undecodable)
    if not examples and _FOLDER.match(root.name) and any(
            f.suffix.lower() in IMAGE_EXTENSIONS for f in root.iterdir() if f.is_file()):
        raise UserError(f"--train_data_dir {train_data_dir!r} is itself a <repeats>_<name> folder of images; "
                        f"kohya's layout wants the folder above it: --train_data_dir {root.absolute().parent}")
    if not examples:
        found = ", ".join(sorted(d.name for d in root.iterdir() if d.is_dir())[:5]) or "no sub-folders"
        raise UserError(
            f"--train_data_dir {train_data_dir!r} holds no training images: expected kohya's layout "
            f"<repeats>_<name>/ folders of images ({', '.join(IMAGE_EXTENSIONS)}) with captions, e.g. "
            f"10_mychar/img1.png + img1{caption_extension}; found: {found}"
        )
    if uncaptioned:
        shown = ", ".join(uncaptioned[:3]) + (f" and {len(uncaptioned) - 3} more" if len(uncaptioned) > 3 else "")
        warn(f"{len(uncaptioned)} image(s) have no caption file with extension {caption_extension!r} "
             f"({shown}); their folder name is used as caption (kohya's rule). Check --caption_extension.")
    return examples


def load_image(path: Path, size: tuple[int, int], flip: bool) -> torch.Tensor:
    """RGB image scaled to cover (width, height), centre-cropped, as a (3, H, W) tensor in [-1, 1]."""
    width, height = size
    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = max(width / im.width, height / im.height)
        new = (max(width, round(im.width * scale)), max(height, round(im.height * scale)))
        im = im.resize(new, Image.Resampling.BICUBIC)
        left, top = (new[0] - width) // 2, (new[1] - height) // 2
        im = im.crop((left, top, left + width, top + height))
        if flip:
            im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8)
    return data.view(height, width, 3).permute(2, 0, 1).float().div(127.5).sub(1.0)


class ImageDataset(torch.utils.data.Dataset):
    """Indexed by the (example index, flip, slot) triples that BatchOrder hands out."""

    def __init__(self, examples: list[Example], size: tuple[int, int], with_pixels: bool = True):
        self.examples = examples
        self.size = size
        self.with_pixels = with_pixels  # False when latents are cached: no image decoding per step

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: tuple[int, bool, int]) -> dict:
        index, flip, slot = key
        example = self.examples[index]
        pixels = load_image(example.image, self.size, flip) if self.with_pixels else None
        return {"index": index, "flip": flip, "slot": slot, "pixels": pixels, "caption": example.caption}


def collate(items: list[dict]) -> dict:
    return {
        "index": [it["index"] for it in items],
        "flip": [it["flip"] for it in items],
        "slot": [it["slot"] for it in items],
        "pixels": torch.stack([it["pixels"] for it in items]) if items[0]["pixels"] is not None else None,
        "caption": [it["caption"] for it in items],
    }


class BatchOrder:
    """Micro-batch number g (counted from the start of training) -> the examples one process trains on.

    Each epoch is a seeded permutation of all examples, padded by wrapping around (as torch's
    DistributedSampler does) so that every process gets a full batch; process r takes slot r of each
    group of num_processes batches.
    """

    def __init__(self, n_examples: int, batch_size: int, num_processes: int, seed: int, flip: bool):
        self.n = n_examples
        self.batch_size = batch_size
        self.num_processes = num_processes
        self.seed = seed
        self.flip = flip
        self.batches_per_epoch = math.ceil(n_examples / (batch_size * num_processes))
        self._cache: tuple[int, list[tuple[int, bool]]] | None = None

    def _epoch_order(self, epoch: int) -> list[tuple[int, bool]]:
        if self._cache is None or self._cache[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.n, generator=g).tolist()
            total = self.batches_per_epoch * self.batch_size * self.num_processes
            order = (order * math.ceil(total / self.n))[:total]
            flips = (torch.rand(total, generator=g) < 0.5).tolist() if self.flip else [False] * total
            self._cache = (epoch, list(zip(order, flips)))
        return self._cache[1]

    def epoch_of(self, micro_batch: int) -> int:
        return micro_batch // self.batches_per_epoch

    def batch(self, micro_batch: int, rank: int) -> list[tuple[int, bool, int]]:
        """(example index, flip, slot) triples; slot numbers every position of the whole run once, so it
        seeds that example's noise the same however the examples are split over processes."""
        epoch, k = divmod(micro_batch, self.batches_per_epoch)
        start = (k * self.num_processes + rank) * self.batch_size
        first_slot = epoch * self.batches_per_epoch * self.batch_size * self.num_processes + start
        chosen = self._epoch_order(epoch)[start:start + self.batch_size]
        return [(index, flip, first_slot + j) for j, (index, flip) in enumerate(chosen)]
