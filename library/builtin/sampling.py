"""Sample images (kohya's prompt-file syntax), the before/after grid and the loss-curve PNG."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .atomic import atomic_write
from .errors import UserError


@dataclass(frozen=True)
class SamplePrompt:
    prompt: str
    negative: str = ""
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    steps: int = 30  # kohya's default sample steps
    scale: float = 7.5  # kohya's default guidance scale


_OPTION = {"n": ("negative", str), "w": ("width", int), "h": ("height", int), "d": ("seed", int),
           "s": ("steps", int), "l": ("scale", float)}


def parse_prompt_line(line: str) -> SamplePrompt:
    """kohya: 'a photo of x --n blurry --w 512 --h 512 --d 42 --s 30 --l 7.5' (options after the prompt)."""
    parts = re.split(r"\s--(?=[a-z]\s)", " " + line.strip())
    sample = SamplePrompt(prompt=parts[0].strip())
    for part in parts[1:]:
        key, _, value = part.partition(" ")
        if key in _OPTION:
            field, cast = _OPTION[key]
            try:
                sample = replace(sample, **{field: cast(value.strip())})
            except ValueError:
                raise UserError(f"sample prompt {line!r}: --{key} {value.strip()!r} is not a valid {cast.__name__}") from None
    return sample


def read_prompt_file(path: str) -> list[SamplePrompt]:
    if not Path(path).is_file():
        raise UserError(f"--sample_prompts {path!r} does not exist")
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    prompts = [parse_prompt_line(ln) for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not prompts:
        raise UserError(f"--sample_prompts {path!r} holds no prompt")
    return prompts


def make_scheduler(sampler: str, config):
    import diffusers

    classes = {
        "ddim": diffusers.DDIMScheduler, "euler": diffusers.EulerDiscreteScheduler,
        "euler_a": diffusers.EulerAncestralDiscreteScheduler, "dpmsolver++": diffusers.DPMSolverMultistepScheduler,
        "pndm": diffusers.PNDMScheduler, "lms": diffusers.LMSDiscreteScheduler, "ddpm": diffusers.DDPMScheduler,
    }
    extra = {"algorithm_type": "dpmsolver++"} if sampler == "dpmsolver++" else {}
    return classes[sampler].from_config(config, **extra)


@torch.no_grad()
def generate(pipe, prompts: list[SamplePrompt], size: tuple[int, int], default_seed: int, autocast) -> list[Image.Image]:
    """One image per prompt; a prompt without --d gets default_seed + its position, so reruns match."""
    images = []
    for i, p in enumerate(prompts):
        generator = torch.Generator(device="cpu").manual_seed(p.seed if p.seed is not None else default_seed + i)
        with autocast():
            out = pipe(p.prompt, negative_prompt=p.negative or None, width=p.width or size[0],
                       height=p.height or size[1], num_inference_steps=p.steps, guidance_scale=p.scale,
                       generator=generator, output_type="pil")
        images.append(out.images[0])
    return images


def _fit(image: Image.Image, cell: int) -> Image.Image:
    # tiny models make tiny images: enlarge with NEAREST so pixels stay sharp; large ones shrink to the cell
    scale = cell / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)


def make_grid(columns: dict[str, list[Image.Image]], prompts: list[str], cell: int = 192) -> Image.Image:
    """One row per prompt, one column per stage ('before', 'step 100', 'after'), with text labels."""
    labels = list(columns)
    label_h, prompt_w = 20, 200
    grid = Image.new("RGB", (prompt_w + cell * len(labels), label_h + cell * len(prompts)), "white")
    draw = ImageDraw.Draw(grid)
    for c, label in enumerate(labels):
        draw.text((prompt_w + c * cell + 4, 4), label, fill="black")
        for r, image in enumerate(columns[label]):
            grid.paste(_fit(image, cell), (prompt_w + c * cell, label_h + r * cell))
    for r, prompt in enumerate(prompts):
        words, line, y = prompt.split(), "", label_h + r * cell + 4
        for word in words:  # wrap the prompt text into the left column
            if len(line) + len(word) > 30:
                draw.text((4, y), line, fill="black")
                line, y = "", y + 14
            line = f"{line} {word}".strip()
        draw.text((4, y), line, fill="black")
    return grid


def save_png(image: Image.Image, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def save_loss_curve(path: str | Path, losses: list[float], lrs: dict[str, list[tuple[int, float]]], title: str) -> Path:
    """Loss (raw and moving average) over steps, and below it the learning rates that were logged."""
    import matplotlib

    matplotlib.use("Agg")  # no display on CI / servers
    import matplotlib.pyplot as plt

    steps = list(range(1, len(losses) + 1))
    window = max(1, len(losses) // 20)
    smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
              for i in range(len(losses))]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(2, 1))
    ax_loss.plot(steps, losses, color="tab:blue", alpha=0.3, label="loss")
    ax_loss.plot(steps, smooth, color="tab:blue", label=f"moving average ({window} steps)")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title(title, fontsize=9)
    ax_loss.legend()
    for name, points in lrs.items():
        ax_lr.plot([s for s, _ in points], [v for _, v in points], label=name)
    ax_lr.set_xlabel("step")
    ax_lr.set_ylabel("learning rate")
    if all(v > 0 for points in lrs.values() for _, v in points):
        ax_lr.set_yscale("log")  # lrs span decades; a zero lr (schedule end, lr 0) cannot be log-scaled
    if lrs:
        ax_lr.legend(fontsize=8)
    fig.tight_layout()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    finally:
        plt.close(fig)

