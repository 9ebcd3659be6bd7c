"""TOML presets in kohya's ``--config_file`` format: find, read, validate, merge.

The preset values live only in ``configs/<name>.toml`` (one place to change them).
A preset file is an ordinary kohya config file: kohya can read it directly as
``--config_file`` once the optimizer hook is active. The launcher's ``--preset`` merges it
*under* the user's own config file and command line (kohya itself reads one config file):

    preset  <  user TOML (--config_file)  <  command line

``optimizer_args`` are merged key by key when both sides configure our optimizer, so
``--preset lora --optimizer_args warmup_steps=100`` keeps the preset's other settings.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Mapping

import toml

from .optimizer_factory import (
    OptimizerArgsError,
    check_keywords,
    check_lr_bounds,
    is_automagic,
    parse_optimizer_args,
    resolve_optimizer_class,
    with_lora_scale,
    with_run_length,
)

PRESET_NAMES = ("lora", "full", "high_performance")

PRESET_DESCRIPTIONS = {
    "lora": "LoRA training (SD1.x, SDXL, ...; LoCon too with sd-scripts): 4 SinkGD iterations, ALLoRA, OrthoGrad",
    "full": "full fine-tune (fine_tune.py, train_db.py, sdxl_train.py): 5 SinkGD iterations, lower lr range",
    "high_performance": "LoRA, faster and lighter: no OrthoGrad, statistics every 10 steps",
}


# The sd-scripts trainers (--script) each shipped preset is made for. The LoRA presets fit the
# network trainers (train_network.py and its subclasses), whose groups are small adapter matrices;
# "full" fits the scripts that train the model's own weights (full_finetune=True, bf16 state).
NETWORK_TRAINERS = ("train_network", "sdxl_train_network", "flux_train_network", "sd3_train_network",
                    "lumina_train_network", "anima_train_network", "hunyuan_image_train_network")
FULL_TRAINERS = ("fine_tune", "train_db", "sdxl_train", "flux_train", "sd3_train", "lumina_train", "anima_train")
PRESET_TRAINERS = {"lora": NETWORK_TRAINERS, "high_performance": NETWORK_TRAINERS, "full": FULL_TRAINERS}


class PresetError(ValueError):
    """A preset or config file that cannot be used (the message names the file and the key)."""


# Keys a preset may set, with their TOML types. A preset is about the optimizer and a few
# training settings that go with it; anything else (paths, dataset, model) belongs to the
# user's own config. ``float`` also accepts a TOML integer; ``int`` never accepts a bool.
PRESET_KEYS: dict[str, type] = {
    "optimizer_type": str,
    "optimizer_args": list,
    "learning_rate": float,
    "unet_lr": float,
    "text_encoder_lr": float,
    "loraplus_lr_ratio": float,
    "loraplus_unet_lr_ratio": float,
    "loraplus_text_encoder_lr_ratio": float,
    "lr_scheduler": str,
    "lr_warmup_steps": int,
    "lr_scheduler_num_cycles": int,
    "lr_scheduler_power": float,
    "max_grad_norm": float,
    "gradient_accumulation_steps": int,
    "gradient_checkpointing": bool,
    "mixed_precision": str,
    "full_bf16": bool,
    "full_fp16": bool,
    "fused_backward_pass": bool,
    "train_batch_size": int,
    "max_train_steps": int,
    "max_train_epochs": int,
    "network_module": str,
    "network_dim": int,
    "network_alpha": float,
    "network_train_unet_only": bool,
    "train_text_encoder": bool,
    "seed": int,
    "save_precision": str,
    "min_snr_gamma": float,
    "noise_offset": float,
}


# --------------------------------------------------------------------------- files


def config_dirs() -> list[Path]:
    """Where preset files are looked up: shipped inside the installed package, or the checkout's configs/."""
    here = Path(__file__).resolve().parent
    return [here / "configs", here.parent / "configs"]


def preset_path(name_or_path: str | Path) -> Path:
    """Path of a preset given by name (``lora``, ``full``, ``high_performance``) or by file path."""
    text = str(name_or_path)
    candidate = Path(text).expanduser()
    if text not in PRESET_NAMES:
        if candidate.is_file():
            return candidate
        if candidate.suffix != ".toml" and candidate.with_suffix(".toml").is_file():
            return candidate.with_suffix(".toml")
        if text.endswith(".toml") or "/" in text or "\\" in text:
            raise PresetError(f"preset file {text} does not exist")
        raise PresetError(f"unknown preset {text!r}; use one of {', '.join(PRESET_NAMES)} or a path to a .toml file")
    for directory in config_dirs():
        path = directory / f"{text}.toml"
        if path.is_file():
            return path
    searched = ", ".join(str(d) for d in config_dirs())
    raise PresetError(f"preset {text!r}: {text}.toml not found (looked in {searched}); the installation is incomplete")


def read_kohya_config(path: str | Path) -> dict[str, Any]:
    """Read a kohya ``--config_file``: tables are flattened one level, section names ignored.

    kohya appends ``.toml`` when the name lacks it; so do we.
    """
    path = Path(path)
    if not path.is_file() and path.suffix != ".toml" and path.with_suffix(path.suffix + ".toml").is_file():
        path = path.with_suffix(path.suffix + ".toml")
    try:
        with open(path, encoding="utf-8") as f:
            data = toml.load(f)
    except FileNotFoundError:
        raise PresetError(f"config file {path} does not exist") from None
    except toml.TomlDecodeError as e:
        raise PresetError(f"config file {path} is not valid TOML: {e}") from None
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def write_kohya_config(config: Mapping[str, Any], path: str | Path) -> Path:
    """Write a flat dict as a kohya config file (what the launcher hands to kohya)."""
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        toml.dump(dict(config), f)
    return path


# A merged config (preset + the user's file) is written to a temporary file for kohya to read; errors
# about one of its keys must name the file the key came from, not that temporary name.
_MERGED_SOURCES: dict[str, dict[str, str]] = {}


def remember_sources(merged_path: str | Path, sources: Mapping[str, str]) -> None:
    """Record, for the merged config file at merged_path, which file each key came from."""
    _MERGED_SOURCES[str(Path(merged_path).resolve())] = dict(sources)


def source_of(config_path: str | Path, key: str) -> str:
    """The file a config key came from: the user's or the preset's for a merged file, else config_path."""
    try:
        resolved = str(Path(config_path).resolve())
    except OSError:
        return str(config_path)
    return _MERGED_SOURCES.get(resolved, {}).get(key, str(config_path))


def merge_sources(preset_file: str, preset: Mapping[str, Any], user_file: str | None,
                  user: Mapping[str, Any]) -> dict[str, str]:
    """Where each key of merge_configs(preset, user) came from; optimizer_args set in both name both."""
    sources = {key: preset_file for key in preset}
    sources.update({key: user_file for key in user} if user_file else {})
    if user_file and "optimizer_args" in preset and "optimizer_args" in user:
        sources["optimizer_args"] = f"{user_file} (merged over {preset_file})"
    return sources


def optimizer_arg_items(value: Any) -> Any:
    """kohya's optimizer_args as a list of "key=value" items. A single string is taken as the command
    line would split it ("warmup_steps=10 orthograd=True"); anything else is returned for the caller's
    type check."""
    return value.split() if isinstance(value, str) else value


def load_preset(name_or_path: str | Path) -> dict[str, Any]:
    """Read and validate a preset; any problem raises PresetError naming the file and the key."""
    path = preset_path(name_or_path)
    config = read_kohya_config(path)
    validate_preset(config, source=str(path))
    return config


def trainer_kind(script: str) -> str | None:
    """"network" (LoRA), "full", or None for a trainer no shipped preset is made for."""
    name = Path(script).stem if script.endswith(".py") else script
    if name in NETWORK_TRAINERS or name.endswith("_train_network"):
        return "network"
    return "full" if name in FULL_TRAINERS else None


def check_preset_script(preset: str, script: str) -> str | None:
    """Does a shipped preset fit the trainer? A LoRA preset on a full fine-tune script, or "full" on a
    LoRA trainer, raises PresetError (either trains with the other kind's lr and full_finetune
    setting, silently); a trainer no preset names returns a warning (it may be intended). A preset
    given as a file is the user's own: not checked."""
    if str(preset) not in PRESET_TRAINERS:
        return None
    name = Path(script).stem if script.endswith(".py") else script
    made_for = PRESET_TRAINERS[str(preset)]
    if name in made_for:
        return None
    kind = trainer_kind(name)
    wanted = "network" if made_for is NETWORK_TRAINERS else "full"
    if kind is not None and kind != wanted:
        fitting = [p for p, scripts in PRESET_TRAINERS.items() if trainer_kind(scripts[0]) == kind]
        trains = "a LoRA (network trainer)" if kind == "network" else "the full model"
        raise PresetError(f"--preset {preset} is made for {', '.join(made_for[:5])}, ...; {name} trains {trains}: "
                          f"use --preset {' or '.join(fitting)}")
    return (f"--preset {preset} is made for {', '.join(made_for[:5])}, ...; {name} is none of them, so its "
            "learning rate and full_finetune setting may not fit this trainer")


def list_presets() -> list[tuple[str, Path, str]]:
    """``(name, path, description)`` of each shipped preset."""
    return [(name, preset_path(name), PRESET_DESCRIPTIONS[name]) for name in PRESET_NAMES]


# --------------------------------------------------------------------------- validation


def validate_preset(config: Mapping[str, Any], source: str = "<preset>") -> None:
    for key, value in config.items():
        expected = PRESET_KEYS.get(key)
        if expected is None:
            raise PresetError(f"{source}: unknown key {key!r}; a preset may set: {', '.join(sorted(PRESET_KEYS))}")
        if key == "optimizer_args":
            value = optimizer_arg_items(value)
        if not _has_type(value, expected):
            raise PresetError(
                f"{source}: {key} must be a TOML {_type_word(expected)}, got {value!r} ({type(value).__name__})"
            )
    if "optimizer_args" in config:
        _validate_optimizer_args(config, source)


def _has_type(value: Any, expected: type) -> bool:
    if isinstance(value, bool):
        return expected is bool
    if expected is float:
        return isinstance(value, (int, float)) and math.isfinite(value)
    if expected is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, expected)


def _type_word(expected: type) -> str:
    return {str: "string", float: "number", int: "integer", bool: "boolean (true/false)",
            list: "list of strings (\"key=value\") or one string \"key=value key=value\""}[expected]


def _validate_optimizer_args(config: Mapping[str, Any], source: str) -> None:
    """Check optimizer_args syntax, keys, and values by building the optimizer on a dummy tensor.

    Building it is cheap and reuses the optimizer's own range checks, so a preset with
    ``max_lr=-1`` fails when it is loaded, not an hour into a run.
    """
    try:
        kwargs = parse_optimizer_args(config["optimizer_args"])
        optimizer_type = config.get("optimizer_type", "AdamW")
        cls = resolve_optimizer_class(optimizer_type)
        check_keywords(cls, kwargs)
        if is_automagic(optimizer_type):
            import torch

            check_lr_bounds(cls, kwargs)
            # total_steps comes from the run's max_train_steps at training time, lora_scale from a LoRA
            # trainer's network_alpha / network_dim: any length and alpha = rank will do here
            cls([torch.zeros(2, 2, requires_grad=True)], lr=float(config.get("learning_rate", 1e-5)),
                **with_lora_scale(optimizer_type, with_run_length(optimizer_type, kwargs, 1000), 1.0))
    except (OptimizerArgsError, ValueError, TypeError) as e:
        raise PresetError(f"{source}: optimizer_args: {str(e).removeprefix('optimizer_args: ')}") from None


# --------------------------------------------------------------------------- merging


def merge_optimizer_args(base: Iterable[str], override: Iterable[str]) -> list[str]:
    """Key-wise merge of two ``optimizer_args`` lists; ``override`` wins, order kept."""
    merged = {item.partition("=")[0].strip(): item for item in optimizer_arg_items(base)}
    for item in optimizer_arg_items(override):
        merged[item.partition("=")[0].strip()] = item
    return list(merged.values())


def overridden_preset_settings(preset_name: str, preset: Mapping[str, Any], user_file: str,
                               user: Mapping[str, Any]) -> list[str]:
    """What the user's config file takes over from the preset, where it changes the run, one line
    each: a kohya config written for another optimizer brings its optimizer_type, learning_rate and
    lr_scheduler along, and the file wins over the preset (merge_configs). Said, not refused: a
    user may mean it."""
    theirs = user.get("optimizer_type", preset.get("optimizer_type"))
    if is_automagic(preset.get("optimizer_type")) and not is_automagic(theirs):
        return [f"{user_file} sets optimizer_type = {theirs!r}, which replaces the preset {preset_name}'s "
                f"{preset['optimizer_type']!r}: this run trains with {theirs} and none of the preset's "
                f"optimizer_args. Remove optimizer_type from {user_file} to train with the preset."]
    why = {"learning_rate": "the lr the preset's settings were measured with",
           "lr_scheduler": "the optimizer warms up and decays its own rates; an outside schedule can only lower them"}
    return [f"{user_file} sets {key} = {user[key]!r} over the preset {preset_name}'s {preset[key]!r} ({reason}). "
            f"Remove {key} from {user_file} to use the preset's."
            for key, reason in why.items() if key in user and key in preset and user[key] != preset[key]]


def merge_configs(preset: Mapping[str, Any], user: Mapping[str, Any]) -> dict[str, Any]:
    """``preset`` < ``user`` (both flat kohya dicts). The command line is applied later, by argparse.

    optimizer_args are merged key by key when both sides use our optimizer; if the user
    switched to another optimizer, the user's list replaces the preset's (the preset's keys
    would mean nothing to it).
    """
    merged = {**preset, **user}
    if "optimizer_args" in merged:
        merged["optimizer_args"] = optimizer_arg_items(merged["optimizer_args"])
    if "optimizer_args" in preset and "optimizer_args" in user:
        same = is_automagic(preset.get("optimizer_type")) and is_automagic(merged.get("optimizer_type"))
        if same:
            merged["optimizer_args"] = merge_optimizer_args(preset["optimizer_args"], user["optimizer_args"])
    elif "optimizer_args" in preset and not is_automagic(merged.get("optimizer_type")):
        del merged["optimizer_args"]  # user chose another optimizer: drop our keys
    return merged
