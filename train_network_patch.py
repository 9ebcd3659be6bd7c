#!/usr/bin/env python
"""Run a kohya sd-scripts trainer with Automagic_Sinkgd selectable by name.

    python train_network_patch.py [launcher options] [kohya options]
    accelerate launch train_network_patch.py [launcher options] [kohya options]

Launcher options (everything else goes to the trainer unchanged):
  --sd_scripts DIR        kohya-ss sd-scripts checkout (default: $SD_SCRIPTS_DIR)
  --script NAME           trainer to run: train_network (default), sdxl_train_network,
                          fine_tune, train_db, sdxl_train, flux_train_network, ...
  --preset NAME|PATH      lora, full, high_performance or a .toml file; merged under your
                          --config_file and command line (preset < config file < command line).
                          lora / high_performance are for the LoRA trainers (*_train_network),
                          full for the full fine-tune scripts: the other way round is an error
  --list_presets          list the presets and exit
  --show_preset NAME      print a preset and exit
  --backend auto|kohya|builtin
                          kohya: run sd-scripts (needs --sd_scripts / SD_SCRIPTS_DIR);
                          builtin: the plugin's own trainer (train_network / fine_tune only);
                          auto (default): kohya when sd-scripts is found, else builtin

With the kohya backend the trainer runs exactly as `python <sd-scripts>/<script>.py ...`
would, from the current directory, with the optimizer hook installed. Before it starts, every
setting of Automagic_Sinkgd the launcher can see (optimizer_args, each group's learning rate,
the run length) is checked, and a wrong one stops the run with one line.
"""

from __future__ import annotations

import argparse
import atexit
import difflib
import importlib
import importlib.util
import os
import runpy
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PLUGIN = "automagic_sinkgd_plugin"  # our package's name in a kohya process (kohya owns `library`)
BUILTIN_SCRIPTS = ("train_network", "fine_tune")


class LauncherError(Exception):
    """A problem with the launcher's own options; printed without a traceback."""


# --------------------------------------------------------------------------- our package


def load_plugin():
    """Import our package as ``automagic_sinkgd_plugin``.

    The ``library/`` folder next to this file wins (a checkout runs its own code); a
    pip-installed copy is used when this file was installed without it.
    """
    if PLUGIN in sys.modules:
        return sys.modules[PLUGIN]
    init = HERE / "library" / "__init__.py"
    if not (HERE / "library" / "kohya_hook.py").is_file():
        return importlib.import_module(PLUGIN)
    spec = importlib.util.spec_from_file_location(PLUGIN, init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PLUGIN] = module
    spec.loader.exec_module(module)
    return module


def plugin_module(name: str):
    load_plugin()
    return importlib.import_module(f"{PLUGIN}.{name}")


def stop_shadowing_kohya_library() -> None:
    """Keep our ``library/`` from hiding kohya's ``library`` package.

    ``python train_network_patch.py`` puts this folder first on sys.path (and ``-m`` or an
    interactive start puts the current directory there): both would make ``import
    library`` find ours. Our code is reached through the PLUGIN alias instead.
    """
    def is_here(entry: str) -> bool:
        try:
            return Path(entry or os.getcwd()).resolve() == HERE
        except OSError:
            return False

    if (HERE / "library" / "kohya_hook.py").is_file():  # only a checkout of ours (never e.g. site-packages)
        sys.path[:] = [entry for entry in sys.path if not is_here(entry)]
    ours = sys.modules.get("library")
    if ours is not None and str(getattr(ours, "__file__", "") or "").startswith(str(HERE / "library")):
        for name in [n for n in sys.modules if n == "library" or n.startswith("library.")]:
            del sys.modules[name]


# --------------------------------------------------------------------------- arguments


def parse_launcher_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """Split our options from the trainer's (which keep their order)."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--sd_scripts", default=None)
    parser.add_argument("--script", default="train_network")
    parser.add_argument("--preset", default=None)
    parser.add_argument("--list_presets", action="store_true")
    parser.add_argument("--show_preset", default=None)
    parser.add_argument("--backend", choices=("auto", "kohya", "builtin"), default="auto")
    return parser.parse_known_args(argv)


def take_option(argv: list[str], flag: str, many: bool = False) -> tuple[list[str] | None, list[str]]:
    """Remove ``flag`` (``--flag v`` / ``--flag=v``; with ``many``, every value up to the next
    ``--option``) from argv. Returns (values or None if absent, remaining argv); the last
    occurrence wins, as with argparse."""
    values, rest, i = None, [], 0
    while i < len(argv):
        token = argv[i]
        if token == flag:
            j = i + 1
            while j < len(argv) and not argv[j].startswith("--") and (many or j == i + 1):
                j += 1
            values, i = argv[i + 1 : j], j
        elif token.startswith(flag + "="):
            values, i = [token[len(flag) + 1 :]], i + 1
        else:
            rest.append(token)
            i += 1
    return values, rest


def apply_preset(preset: str, argv: list[str]) -> list[str]:
    """Merge the preset under the user's --config_file and command line; return the trainer's argv.

    kohya reads a single --config_file and lets the command line override it, so the
    merged file (preset < user file) is handed over as --config_file. --optimizer_args on
    the command line are merged key by key into the preset's when both configure our
    optimizer (``--preset lora --optimizer_args warmup_steps=100`` keeps the rest).
    """
    presets = plugin_module("presets")
    factory = plugin_module("optimizer_factory")
    config = presets.load_preset(preset)
    user_file, argv = take_option(argv, "--config_file")
    user_config = presets.read_kohya_config(user_file[0]) if user_file else {}
    sources = presets.merge_sources(str(presets.preset_path(preset)), config, user_file[0] if user_file else None,
                                    user_config)
    if user_file:
        for line in presets.overridden_preset_settings(preset, config, user_file[0], user_config):
            print(f"train_network_patch.py: {line}", file=sys.stderr)
        config = presets.merge_configs(config, user_config)
    cli_type, _ = take_option(argv, "--optimizer_type")
    cli_args, rest = take_option(argv, "--optimizer_args", many=True)
    optimizer_type = cli_type[0] if cli_type else config.get("optimizer_type")
    if cli_args is not None and factory.is_automagic(config.get("optimizer_type")) and factory.is_automagic(optimizer_type):
        config["optimizer_args"] = presets.merge_optimizer_args(config.get("optimizer_args", []), cli_args)
        sources["optimizer_args"] = f"--optimizer_args (merged over {sources.get('optimizer_args')})"
        argv = rest
    elif "optimizer_args" in config and not factory.is_automagic(optimizer_type):
        del config["optimizer_args"]  # another optimizer on the command line: the preset's keys mean nothing to it
    source = f" under {user_file[0]}" if user_file else ""
    print(f"train_network_patch.py: using preset {presets.preset_path(preset)}{source}", file=sys.stderr)
    fd, path = tempfile.mkstemp(prefix="automagic_preset_", suffix=".toml")
    os.close(fd)
    atexit.register(lambda: os.path.exists(path) and os.remove(path))
    presets.write_kohya_config(config, path)
    presets.remember_sources(path, sources)  # errors about a key name the file it came from, not this one
    return ["--config_file", path] + argv


def has_flag(argv: list[str], flag: str) -> bool:
    """A store_true option (``--flag``) is on the command line."""
    return any(token == flag or token.startswith(flag + "=") for token in argv)


class KnownSettings:
    """The trainer's settings as far as the launcher can know them before anything loads: the
    config file it will read, then the command line (which wins, as in kohya)."""

    def __init__(self, argv: list[str]):
        self.argv = argv
        config_file, _ = take_option(argv, "--config_file")
        self.config_file = config_file[0] if config_file else None
        self.config = plugin_module("presets").read_kohya_config(self.config_file) if self.config_file else {}

    def get(self, key: str, many: bool = False):
        """``(value, where it was set)``, or ``(None, None)``; numbers that do not parse are left to
        the trainer's own argument parser."""
        values, _ = take_option(self.argv, f"--{key}", many=many)
        if values is not None:
            value, where = (values if many else values[0]), f"--{key}"
        elif key in self.config:
            value, where = self.config[key], f"{key} in {plugin_module('presets').source_of(self.config_file, key)}"
        else:
            return None, None
        return value, where

    def number(self, key: str):
        value, where = self.get(key)
        try:
            return (float(value), where) if value is not None and not isinstance(value, bool) else (None, None)
        except (TypeError, ValueError):
            return None, None

    def flag(self, key: str) -> bool:
        return has_flag(self.argv, f"--{key}") or self.config.get(key) is True


# kohya options that set the learning rate of a param group (train_network.py and its subclasses,
# fine_tune.py / train_db.py, sdxl_train.py, sd3_train.py)
GROUP_LR_OPTIONS = ("learning_rate", "unet_lr", "text_encoder_lr", "learning_rate_te", "learning_rate_te1",
                    "learning_rate_te2", "learning_rate_te3")


def known_learning_rates(settings: KnownSettings) -> dict[str, float]:
    """Every lr the trainer will hand a param group, named by where it was set (LoRA+ up-weight
    groups as ratio x lr)."""
    lrs: dict[str, float] = {}
    for key in GROUP_LR_OPTIONS:
        value, where = settings.get(key, many=key == "text_encoder_lr")
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            try:
                if item is not None and not isinstance(item, bool):
                    lrs[where + (f"[{i}]" if isinstance(value, list) and len(value) > 1 else "")] = float(item)
            except (TypeError, ValueError):
                continue  # kohya's argparse names it
    base, base_where = settings.number("learning_rate")
    for part, lr_key in (("unet", "unet_lr"), ("text_encoder", "text_encoder_lr")):
        ratio, ratio_where = settings.number(f"loraplus_{part}_lr_ratio")
        if ratio is None:
            ratio, ratio_where = settings.number("loraplus_lr_ratio")
        lr, lr_where = settings.get(lr_key, many=lr_key == "text_encoder_lr")
        if isinstance(lr, list):  # text_encoder_lr: the first text encoder's
            lr, lr_where = (lr[0], lr_where) if lr else (None, None)
        try:
            lr, lr_where = (float(lr), lr_where) if lr is not None else (base, base_where)
        except (TypeError, ValueError):
            continue
        if ratio is not None and lr is not None:
            lrs[f"LoRA+ lr ({ratio_where} {ratio:g} x {lr_where} {lr:g})"] = ratio * lr
    return lrs


def check_optimizer_choice(argv: list[str], script: str = "train_network", builtin: bool = False) -> None:
    """Fail in a second, not after the model has loaded: validate every setting of our optimizer
    the trainer will see (config file, then command line): optimizer_args keys and values, each
    group's learning rate, the run length, the LoRA scale, and the flags the optimizer depends on.
    ``script`` is the trainer (a network trainer passes network_alpha / network_dim as lora_scale);
    ``builtin``: the built-in trainer, whose train_network is a full fine-tune with full_finetune=True."""
    factory = plugin_module("optimizer_factory")
    settings = KnownSettings(argv)
    optimizer_type = settings.get("optimizer_type")[0]
    if not factory.is_automagic(optimizer_type):
        return
    raw_args, where = settings.get("optimizer_args", many=True)
    where = where or ""
    if settings.flag("fused_backward_pass"):
        steps, _ = settings.number("gradient_accumulation_steps")
        if steps is not None and steps != 1:
            raise LauncherError("--fused_backward_pass needs --gradient_accumulation_steps 1 "
                                f"(got {steps:g}): each gradient is applied as soon as it is computed")
    import torch

    try:
        kwargs = factory.parse_optimizer_args(raw_args)
        cls = factory.resolve_optimizer_class(optimizer_type)
        factory.check_keywords(cls, kwargs)
        factory.check_lr_bounds(cls, kwargs)
    except (ValueError, TypeError) as error:
        raise optimizer_args_error(where, error) from None
    lrs = known_learning_rates(settings)
    try:
        factory.check_learning_rates(cls, kwargs, lrs)
    except factory.OptimizerArgsError as error:
        raise LauncherError(str(error)) from None
    # A one-element stand-in runs the optimizer's own range checks with the run's length (kohya's
    # default when neither max_train_steps nor the epochs are known) and its base lr, or max_lr.
    steps, _ = settings.number("max_train_steps")
    run_length = int(steps) if steps and steps > 0 else plugin_module("kohya_hook").KOHYA_DEFAULT_MAX_TRAIN_STEPS
    lr = lrs.get(settings.get("learning_rate")[1] or "", factory.lr_bounds(cls, kwargs)[1])
    # and the LoRA scale a network trainer passes (a full fine-tune has none)
    lora_scale = None
    lora_run = script in plugin_module("presets").NETWORK_TRAINERS and not (builtin and kwargs.get("full_finetune"))
    if lora_run or settings.get("network_module")[0]:
        alpha, _ = settings.number("network_alpha")
        dim, _ = settings.number("network_dim")
        lora_scale = factory.kohya_lora_scale(alpha, int(dim) if dim else None)
    try:
        cls([torch.zeros(1, 1, requires_grad=True)], lr=lr,
            **factory.with_lora_scale(optimizer_type, factory.with_run_length(optimizer_type, kwargs, run_length),
                                      lora_scale))
    except (ValueError, TypeError) as error:  # the optimizer's own message, without a traceback
        raise optimizer_args_error(where, error) from None


def optimizer_args_error(where: str, error: Exception) -> LauncherError:
    text = str(error).removeprefix("optimizer_args: ")
    where = where.removeprefix("optimizer_args in ")
    if where.startswith("--optimizer_args"):
        return LauncherError(f"{where}: {text}")
    return LauncherError(f"{where + ': ' if where else ''}optimizer_args: {text}")


def check_preset_fits_script(preset: str, script: str) -> None:
    """A shipped preset on a trainer it is not made for: a LoRA preset on a full fine-tune script
    (or the reverse) is an error; a script no preset names (textual inversion, ControlNet, a
    trainer of your own) is a warning with the reason, as it may be intended."""
    warning = plugin_module("presets").check_preset_script(preset, script)
    if warning:
        print(f"train_network_patch.py: warning: {warning}", file=sys.stderr)


def script_implements(sd_scripts: Path, script: str, option: str) -> bool:
    """The trainer's own source reads ``args.<option>``. (kohya declares --fused_backward_pass for
    every trainer in train_util; the LoRA trainers subclass train_network.py, which never reads it.)"""
    path = sd_scripts / (script if script.endswith(".py") else script + ".py")
    return path.is_file() and f"args.{option}" in path.read_text(errors="ignore")


def warn_ignored_options(sd_scripts: Path, script: str, argv: list[str]) -> None:
    """kohya accepts --fused_backward_pass in every trainer, but only some implement it; elsewhere it
    is silently ignored (plain kohya asserts on the optimizer instead), so say so."""
    settings = KnownSettings(argv)
    if settings.flag("fused_backward_pass") and not script_implements(sd_scripts, script, "fused_backward_pass"):
        print(f"train_network_patch.py: warning: --fused_backward_pass does nothing in {Path(script).stem}: it "
              "steps the optimizer once per step (the full fine-tune scripts sdxl_train, flux_train, sd3_train "
              "implement it)", file=sys.stderr)


# --------------------------------------------------------------------------- backends


def find_sd_scripts(option: str | None) -> Path | None:
    text = option or os.environ.get("SD_SCRIPTS_DIR")
    if not text:
        return None
    where = "--sd_scripts" if option else "SD_SCRIPTS_DIR"
    path = Path(text).expanduser().resolve()
    if not (path / "library" / "train_util.py").is_file():
        raise LauncherError(f"{where}={text} is not a kohya-ss sd-scripts folder (no library/train_util.py in it)")
    return path


def find_script(sd_scripts: Path, name: str) -> Path:
    file = name if name.endswith(".py") else name + ".py"
    path = sd_scripts / file
    if path.is_file():
        return path
    # trainers: scripts that build an optimizer themselves or subclass train_network's NetworkTrainer
    trainers = sorted(
        p.stem for p in sd_scripts.glob("*.py")
        if any(mark in p.read_text(errors="ignore") for mark in ("get_optimizer(", "NetworkTrainer"))
    )
    close = difflib.get_close_matches(Path(file).stem, trainers, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise LauncherError(f"--script {name}: {path} does not exist{hint}; trainers in {sd_scripts}: {', '.join(trainers)}")


def run_kohya(sd_scripts: Path, script: str, argv: list[str]) -> None:
    script_path = find_script(sd_scripts, script)
    warn_ignored_options(sd_scripts, script_path.name, argv)
    stop_shadowing_kohya_library()
    plugin_module("kohya_hook").install()
    sys.path.insert(0, str(sd_scripts))  # as when the script is run directly: its folder first
    sys.argv = [str(script_path)] + argv
    runpy.run_path(str(script_path), run_name="__main__")


def run_builtin(script: str, argv: list[str]) -> int:
    name = script[:-3] if script.endswith(".py") else script
    if name not in BUILTIN_SCRIPTS:
        raise LauncherError(
            f"--script {script} needs kohya-ss sd-scripts: pass --sd_scripts /path/to/sd-scripts or set "
            f"SD_SCRIPTS_DIR (without sd-scripts only {', '.join(BUILTIN_SCRIPTS)} can run, on the built-in trainer)"
        )
    stop_shadowing_kohya_library()
    return plugin_module("builtin.trainer").main(argv, script=name)


def print_presets() -> None:
    presets = plugin_module("presets")
    for name, path, description in presets.list_presets():
        print(f"{name:<18} {description}\n{'':<18} {path}")


def show_preset(name: str) -> None:
    presets = plugin_module("presets")
    presets.load_preset(name)  # validated first
    path = presets.preset_path(name)
    print(f"# {path}\n{path.read_text(encoding='utf-8')}", end="")


def run(argv: list[str]) -> int:
    own, rest = parse_launcher_args(argv)
    if own.list_presets:
        print_presets()
        return 0
    if own.show_preset:
        show_preset(own.show_preset)
        return 0
    if any(a in ("-h", "--help") for a in rest):
        print(__doc__)  # then the trainer's own help, when there is one
    sd_scripts = find_sd_scripts(own.sd_scripts) if own.backend != "builtin" else None
    if own.preset:
        # a kohya script is a LoRA or a full trainer by itself; the built-in train_network follows
        # the preset (full_finetune=True makes it a full fine-tune)
        if sd_scripts is not None:
            check_preset_fits_script(own.preset, own.script)
        rest = apply_preset(own.preset, rest)
    check_optimizer_choice(rest, own.script, builtin=sd_scripts is None)
    if sd_scripts is not None:
        run_kohya(sd_scripts, own.script, rest)
        return 0
    if own.backend == "kohya":
        raise LauncherError(
            "--backend kohya needs kohya-ss sd-scripts: pass --sd_scripts /path/to/sd-scripts or set SD_SCRIPTS_DIR"
        )
    return run_builtin(own.script, rest)


def _known_errors() -> tuple[type, ...]:
    """Our own error types: shown as one clear line instead of a traceback."""
    errors: list[type] = [LauncherError]
    if PLUGIN in sys.modules:
        for module, names in (("optimizer_factory", ("OptimizerArgsError", "ShardedParamsError")), ("presets", ("PresetError",))):
            loaded = sys.modules.get(f"{PLUGIN}.{module}")
            errors += [getattr(loaded, n) for n in names if loaded is not None]
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: our own errors become one clear line and exit status 2."""
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except Exception as error:  # noqa: BLE001 - re-raised unless it is one of ours
        if not isinstance(error, _known_errors()):
            raise
        print(f"train_network_patch.py: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
