"""Build an optimizer from a kohya-style name and ``--optimizer_args`` items.

This is the part of the kohya glue that does not need kohya: the launcher's hook
(``kohya_hook``) and the built-in trainer both call :func:`build_optimizer`.

Names understood by :func:`build_optimizer`:

* ``automagic_sinkgd`` (any case, or the class name ``Automagic_Sinkgd``), or a dotted
  path ending in ``automagic_sinkgd.Automagic_Sinkgd``: our optimizer;
* ``AdamW`` (``torch.optim.AdamW``), ``Prodigy`` (needs ``prodigyopt``);
* any ``torch.optim`` class name (any case);
* a dotted path ``module.Class``, imported as kohya does.

``--optimizer_args`` follow kohya's syntax: ``key=value`` where the value is a Python
literal (strings quoted, booleans ``True``/``False``, ``betas=0.9,0.99`` is a tuple).
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import logging
from typing import Any, Callable, Iterable, Mapping

import torch

logger = logging.getLogger(__name__)

AUTOMAGIC_NAME = "automagic_sinkgd"
AUTOMAGIC_CLASS_NAME = "Automagic_Sinkgd"


class OptimizerArgsError(ValueError):
    """A bad ``--optimizer_type`` / ``--optimizer_args`` value (the message says how to fix it)."""


class ShardedParamsError(RuntimeError):
    """The optimizer would see flattened 1-D shards (DeepSpeed ZeRO, FSDP) instead of weight matrices."""


# --------------------------------------------------------------------------- parsing


def parse_optimizer_args(items: Iterable[str] | str | None) -> dict[str, Any]:
    """Parse kohya ``--optimizer_args`` items (``key=value``, value a Python literal).

    Stricter and clearer than kohya's own loop: surrounding spaces are stripped (kohya
    would make ``"momentum "`` a key), a missing ``=`` or a key given twice is an error,
    and a value that is not a literal says how to write strings and booleans.
    A single string is split on whitespace, as a shell would split the flag's values.
    """
    if items is None:
        return {}
    if isinstance(items, str):
        items = items.split()
    kwargs: dict[str, Any] = {}
    for item in items:
        if not isinstance(item, str):
            raise OptimizerArgsError(
                f"optimizer_args: each item must be a string 'key=value', got {item!r} ({type(item).__name__})"
            )
        key, sep, text = item.partition("=")
        key, text = key.strip(), text.strip()
        if not sep or not key.isidentifier():
            raise OptimizerArgsError(
                f"optimizer_args: item {item!r} is not 'key=value' (e.g. weight_decay=1e-4 or tag='x')"
            )
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise OptimizerArgsError(
                f"optimizer_args: the value of {key!r} ({text!r}) is not a Python literal; "
                f"quote strings ({key}='{text}') and write booleans as True/False"
            ) from None
        if key in kwargs:
            raise OptimizerArgsError(f"optimizer_args: {key!r} is given twice ({kwargs[key]!r} and {value!r})")
        kwargs[key] = value
    return kwargs


def format_optimizer_args(kwargs: Mapping[str, Any]) -> str:
    """kohya's ``optimizer_args`` string (``k=v,k=v``), stored in ``ss_optimizer`` metadata."""
    return ",".join(f"{k}={v}" for k, v in kwargs.items())


# --------------------------------------------------------------------------- names


def is_automagic(optimizer_type: str | None) -> bool:
    """True for our optimizer's short name, class name or dotted path (any case).

    A dotted path counts only if its module is named ``automagic_sinkgd``
    (``library.automagic_sinkgd.Automagic_Sinkgd``,
    ``automagic_sinkgd_plugin.automagic_sinkgd.Automagic_Sinkgd``): another package's
    class that happens to share the name is left to kohya.
    """
    if not optimizer_type:
        return False
    parts = optimizer_type.strip().lower().split(".")
    if parts[-1] != AUTOMAGIC_NAME:
        return False
    return len(parts) == 1 or parts[-2] == AUTOMAGIC_NAME


def automagic_class() -> type:
    """Our optimizer class, imported relative to this package (works as ``library`` or as the plugin alias)."""
    from .automagic_sinkgd import Automagic_Sinkgd

    return Automagic_Sinkgd


def resolve_optimizer_class(optimizer_type: str) -> type:
    """Map a kohya-style optimizer name to a class (see the module docstring)."""
    name = (optimizer_type or "AdamW").strip()
    if is_automagic(name):
        if "." in name:  # the user named a module: honour it (e.g. a copy inside sd-scripts' library/) ...
            try:
                return _import_dotted(name)
            except OptimizerArgsError:  # ... or, when there is no such copy, use ours
                pass
        return automagic_class()
    if "." in name:
        return _import_dotted(name)
    if name.lower() == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise OptimizerArgsError("optimizer_type Prodigy needs the prodigyopt package: pip install prodigyopt") from None
        return Prodigy
    torch_classes = _torch_optimizer_classes()
    cls = torch_classes.get(name.lower())
    if cls is None:
        allowed = [AUTOMAGIC_NAME, "Prodigy"] + sorted(c.__name__ for c in torch_classes.values())
        raise OptimizerArgsError(
            f"optimizer_type {name!r} is unknown{_did_you_mean(name, allowed)}; "
            f"use one of {', '.join(allowed)} or a dotted path module.Class"
        )
    return cls


def _torch_optimizer_classes() -> dict[str, type]:
    return {
        n.lower(): obj
        for n, obj in vars(torch.optim).items()
        if inspect.isclass(obj) and issubclass(obj, torch.optim.Optimizer) and obj is not torch.optim.Optimizer
    }


def _import_dotted(path: str) -> type:
    module_name, _, class_name = path.strip().rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise OptimizerArgsError(f"optimizer_type {path!r}: cannot import module {module_name!r} ({e})") from e
    try:
        return getattr(module, class_name)
    except AttributeError:
        raise OptimizerArgsError(f"optimizer_type {path!r}: module {module_name!r} has no {class_name!r}") from None


# --------------------------------------------------------------------------- keyword checks


def valid_keywords(cls: type) -> list[str] | None:
    """Keyword names ``cls(params, ...)`` accepts, or None when it takes ``**kwargs`` (cannot check)."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]  # drop self
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    names = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return [n for n in names if n != "params"]


def check_keywords(cls: type, kwargs: Mapping[str, Any]) -> None:
    """Reject unknown keys before construction, listing the valid ones and the closest match."""
    valid = valid_keywords(cls)
    if valid is None:
        return
    for key in kwargs:
        if key == "lr":
            raise OptimizerArgsError(
                "optimizer_args: do not pass lr; set --learning_rate (or unet_lr / text_encoder_lr) instead"
            )
        if key not in valid:
            settable = [k for k in valid if k != "lr"]
            raise OptimizerArgsError(
                f"optimizer_args: {cls.__name__} has no setting {key!r}{_did_you_mean(key, settable)}; "
                f"valid keys: {', '.join(settable)}"
            )


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    lowered = {c.lower(): c for c in choices}
    match = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
    return f" (did you mean {lowered[match[0]]!r}?)" if match else ""


# --------------------------------------------------------------------------- run length


# The warm-up a trainer gives Automagic_Sinkgd when neither the user nor a preset set one: a
# quarter of the run. At real SD learning-rate scale the presets' warm-ups were a quarter of the
# benchmark's runs (500 of 2000 LoRA steps, 1000 of 4000 full steps) and did as well as half
# the run (LoRA) or better (full); the class default of 500 steps would never leave warm-up in a
# 300-step run and would be a tenth of a 5000-step one.
RUN_LENGTH_WARMUP_SHARE = 0.25


def with_run_length(optimizer_type: str | None, kwargs: Mapping[str, Any], max_train_steps: int | None) -> dict:
    """``kwargs`` plus, for Automagic_Sinkgd, what the trainer knows of the run's length and the
    user did not set: ``total_steps=max_train_steps`` (which ``decay_horizon="run"`` and a
    warm-up share need) and ``warmup_steps=RUN_LENGTH_WARMUP_SHARE``, a share of it. Other
    optimizers get ``kwargs`` unchanged."""
    kwargs = dict(kwargs)
    if is_automagic(optimizer_type) and max_train_steps:
        if "total_steps" not in kwargs:
            kwargs["total_steps"] = int(max_train_steps)
        kwargs.setdefault("warmup_steps", RUN_LENGTH_WARMUP_SHARE)
    return kwargs


# kohya's LoRA modules: network_dim None means 4, network_alpha None means 1, alpha 0 means
# alpha = dim (no scaling).
KOHYA_DEFAULT_NETWORK_DIM, KOHYA_DEFAULT_NETWORK_ALPHA = 4, 1.0


def kohya_lora_scale(network_alpha: float | None, network_dim: int | None) -> float:
    """The LoRA's alpha / rank as kohya's LoRA modules compute it from --network_alpha / --network_dim."""
    dim = network_dim or KOHYA_DEFAULT_NETWORK_DIM
    alpha = KOHYA_DEFAULT_NETWORK_ALPHA if network_alpha is None else network_alpha
    return float(alpha or dim) / dim


def with_lora_scale(optimizer_type: str | None, kwargs: Mapping[str, Any], lora_scale: float | None) -> dict:
    """``kwargs`` plus, for Automagic_Sinkgd on a LoRA trainer, ``lora_scale`` (network_alpha /
    network_dim) unless the user set it: read when ``lora_scale_power`` is on."""
    kwargs = dict(kwargs)
    if is_automagic(optimizer_type) and lora_scale is not None:
        kwargs.setdefault("lora_scale", float(lora_scale))
    return kwargs


def describe_lora_scaling(optimizer: torch.optim.Optimizer) -> str | None:
    """One line saying how ``lora_scale_power`` moved the learning rates (None when it did not), so a
    user sees the rates that train: e.g. alpha 1 with dim 8 under the ``lora`` preset, x8."""
    groups = [g for g in optimizer.param_groups if g.get("lora_lr_factor", 1.0) != 1.0]
    if not groups:
        return None
    group = groups[0]
    lrs = ", ".join(f"{g.get('initial_lr', g['lr']):.3g}" for g in groups)
    return (f"network_alpha / network_dim = {group['lora_scale']:g}: learning rates x{group['lora_lr_factor']:.3g} "
            f"(lora_scale_power; the lr given is the one for alpha = dim), now {lrs}; "
            "lora_scale_power=0 keeps them as given")


def follow_run_length(optimizer: torch.optim.Optimizer, steps: int) -> None:
    """Keep the trainer's run length as every group's total_steps, also after a resume (the saved
    groups would bring back the length of the run that saved them, e.g. when a run is extended).
    ``optimizer._run_length`` may be updated later (kohya knows the final length only then).
    ``optimizer._steps_restart_on_resume`` (set by the kohya hook for kohya's fine-tune scripts):
    the trainer counts a resumed run's steps from 0 again, so its length is the steps still to go
    and the run ends at the restored step count plus that length."""
    optimizer._run_length = int(steps)
    optimizer._steps_restart_on_resume = False

    def reapply(opt):
        length = opt._run_length
        if opt._steps_restart_on_resume:
            length += max((int(s.get("step", 0)) for s in opt.state.values()), default=0)
        for group in opt.param_groups:
            group["total_steps"] = length

    optimizer.register_load_state_dict_post_hook(reapply)


# --------------------------------------------------------------------------- build


def build_optimizer(
    optimizer_type: str,
    trainable_params,
    learning_rate: float,
    optimizer_args: Iterable[str] | Mapping[str, Any] | str | None = None,
    report: Callable[[str], None] | None = None,
    run_length: int | None = None,
    lora_scale: float | None = None,
) -> tuple[str, str, torch.optim.Optimizer]:
    """Build the optimizer the way kohya's ``get_optimizer`` does and return its triple.

    ``trainable_params`` is passed through untouched (kohya's list of group dicts, each
    with its own ``lr`` for U-Net / text encoder / LoRA+ groups; ``params`` may be a
    ``dict_values`` view). Returns ``(name, args_string, optimizer)`` where
    ``name = cls.__module__ + "." + cls.__name__``: kohya stores ``name(args)`` as the
    ``ss_optimizer`` metadata of the saved model. The args string follows a resume: see
    :func:`watch_resumed_settings` (``report`` receives its warning; default: logging).
    ``run_length`` (the run's max_train_steps) goes to Automagic_Sinkgd as ``total_steps`` unless
    the user set it (:func:`with_run_length`); ``lora_scale`` (a LoRA trainer's network_alpha /
    network_dim) likewise (:func:`with_lora_scale`). The args string keeps the user's own arguments.
    """
    if isinstance(optimizer_args, Mapping):
        kwargs = dict(optimizer_args)
    else:
        kwargs = parse_optimizer_args(optimizer_args)
    cls = resolve_optimizer_class(optimizer_type)
    check_keywords(cls, kwargs)
    if is_automagic(optimizer_type):
        check_lr_bounds(cls, kwargs)
        check_learning_rates(cls, kwargs, {"learning_rate": learning_rate, **group_lrs(trainable_params)})
    filled = with_lora_scale(optimizer_type, with_run_length(optimizer_type, kwargs, run_length), lora_scale)
    optimizer = cls(trainable_params, lr=learning_rate, **filled)
    if "total_steps" in filled and "total_steps" not in kwargs:
        follow_run_length(optimizer, filled["total_steps"])
    if is_automagic(optimizer_type):
        install_shard_guard(optimizer)
    args_text = watch_resumed_settings(optimizer, kwargs, report or logger.warning)
    return f"{cls.__module__}.{cls.__name__}", args_text, optimizer


def group_lrs(trainable_params) -> dict[str, Any]:
    """``{"lr of param group i": lr}`` for kohya's list of group dicts (nothing for a bare parameter list)."""
    if not isinstance(trainable_params, (list, tuple)):
        return {}
    return {f"lr of param group {i}": g["lr"] for i, g in enumerate(trainable_params)
            if isinstance(g, Mapping) and "lr" in g}


def check_lr_bounds(cls: type, kwargs: Mapping[str, Any]) -> None:
    """min_lr above max_lr is one mistake with two names: say so with both values, whichever was set."""
    low, high = lr_bounds(cls, kwargs)
    numbers = isinstance(low, (int, float)) and isinstance(high, (int, float))
    if numbers and low >= 0 and high > 0 and low > high:  # each alone in range: the optimizer names the other cases
        raise OptimizerArgsError(
            f"optimizer_args: min_lr={low:g} is above max_lr={high:g}; min_lr <= max_lr is required "
            "(the learning-rate mask lives in [min_lr, max_lr])"
        )


def lr_bounds(cls: type, kwargs: Mapping[str, Any]) -> tuple[Any, Any]:
    """(min_lr, max_lr) the optimizer will use: the user's or the class defaults."""
    defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()}
    return kwargs.get("min_lr", defaults.get("min_lr")), kwargs.get("max_lr", defaults.get("max_lr"))


def check_learning_rates(cls: type, kwargs: Mapping[str, Any], lrs: Mapping[str, Any]) -> None:
    """Each learning rate the trainer will hand a group must lie in the mask's [min_lr, max_lr]
    (Automagic_Sinkgd adapts a per-element rate inside it); ``lrs`` maps where each was set
    (``--learning_rate``, ``unet_lr``, ...) to its value. 0 is kohya's "do not train this part"."""
    low, high = lr_bounds(cls, kwargs)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
        return  # the optimizer's own checks name a non-numeric bound
    for where, lr in lrs.items():
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or lr == 0:
            continue
        if not low <= lr <= high:
            habit = ("; lr=1 is a Prodigy / D-Adaptation habit, this optimizer takes a real learning rate"
                     if lr >= 0.1 else "")
            raise OptimizerArgsError(
                f"{where}={lr:g} is out of range for {cls.__name__}: allowed min_lr <= lr <= max_lr, i.e. "
                f"[{low:g}, {high:g}] (the optimizer_args' min_lr / max_lr){habit}"
            )


# --------------------------------------------------------------------------- resume


# Group keys that are not settings: the parameters, and the lr an LR scheduler moves during training.
# The base lr (initial_lr) is a setting and is compared.
_RUNTIME_GROUP_KEYS = frozenset({"params", "lr"})
# Settings a group holds under another key: Automagic_Sinkgd keeps its mask bounds under mask_*_lr,
# since schedulers such as OneCycleLR write min_lr / max_lr into the groups.
_GROUP_KEY_OF = {"min_lr": "mask_min_lr", "max_lr": "mask_max_lr"}


def _group_key(group: Mapping[str, Any], setting: str) -> str:
    alias = _GROUP_KEY_OF.get(setting)
    return alias if alias is not None and alias in group else setting


def settings_overridden_by_state(current_groups, saved_groups, keys: Iterable[str]) -> list[tuple[int, str, Any, Any]]:
    """``(group, key, saved, requested)`` for every setting ``load_state_dict`` will replace.

    torch's ``Optimizer.load_state_dict`` takes each group's settings from the saved state, so a
    value changed on the command line of a resumed run is silently dropped; this lists them.
    """
    changed = []
    for index, (current, saved) in enumerate(zip(current_groups, saved_groups)):
        for key in keys:
            now, then = _group_key(current, key), _group_key(saved, key)
            if key in _RUNTIME_GROUP_KEYS or now not in current or then not in saved:
                continue
            if not _same_setting(current[now], saved[then]):
                changed.append((index, key, saved[then], current[now]))
    return changed


def _same_setting(a: Any, b: Any) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and bool(torch.equal(a.cpu(), b.cpu()))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - incomparable values are different settings
        return False


def _as_given(group: Mapping[str, Any], key: str, scaled: Iterable[str]) -> Any:
    """A saved group's setting as the user wrote it: the ``scaled`` ones (the optimizer's
    ``LORA_SCALED``) divided by the group's LoRA-scale factor."""
    value = group[_group_key(group, key)]
    factor = group.get("lora_lr_factor", 1.0)
    return value / factor if key in scaled and factor != 1.0 and isinstance(value, (int, float)) else value


def describe_overrides(changed: list[tuple[int, str, Any, Any]], n_groups: int) -> str:
    """One warning line: each overridden key with the saved value (in effect) and the requested one."""
    by_key: dict[str, list[tuple[int, Any, Any]]] = {}
    for index, key, saved, requested in changed:
        by_key.setdefault(key, []).append((index, saved, requested))
    parts = []
    for key, rows in by_key.items():
        where = "" if len(rows) == n_groups else " in group " + ",".join(str(i) for i, _, _ in rows)
        saved, requested = rows[0][1], rows[0][2]
        parts.append(f"{key}={saved!r} (requested {requested!r}){where}")
    return ("resuming: the saved optimizer state overrides " + "; ".join(parts) + ". The saved values are "
            "the ones in effect (torch's load_state_dict keeps a state's group settings); start without "
            "--resume to use the new ones")


class OptimizerArgsText(str):
    """kohya's ``optimizer_args`` string, which follows the settings in effect after a resume.

    kohya builds the ``ss_optimizer`` metadata as ``name + f"({optimizer_args})"`` after it has
    resumed, from the string ``get_optimizer`` returned before. The string compares as the
    requested text, but formats (and measures) as what the loaded state put in effect, so the
    saved model records the settings that really trained it.
    """

    def __new__(cls, text: str):
        obj = super().__new__(cls, text)
        obj.in_effect = text
        return obj

    def __str__(self) -> str:
        return self.in_effect

    def __format__(self, spec: str) -> str:
        return format(self.in_effect, spec)

    def __len__(self) -> int:
        return len(self.in_effect)


def watch_resumed_settings(optimizer: torch.optim.Optimizer, kwargs: Mapping[str, Any],
                           report: Callable[[str], None]) -> OptimizerArgsText:
    """Warn, when a state is loaded, about each setting it overrides; keep the args text in effect.

    A load_state_dict pre-hook (torch >= 2.1): it sees the saved groups before torch copies them.
    """
    text = OptimizerArgsText(format_optimizer_args(kwargs))
    # the constructor's settings (internal group keys are not the user's; those the optimizer keeps
    # from its own configuration on load are not overridden), and the base lr
    kept = set(getattr(type(optimizer), "KEPT_ON_LOAD", ()))
    scaled = set(getattr(type(optimizer), "LORA_SCALED", ()))
    keys = [k for k in (valid_keywords(type(optimizer)) or optimizer.defaults)
            if k not in _RUNTIME_GROUP_KEYS and k not in kept]
    if "total_steps" not in kwargs:  # the trainer's run length (follow_run_length), not a user setting
        keys = [k for k in keys if k != "total_steps"]
    keys.append("initial_lr")

    def compare(opt, state_dict):
        saved_groups = state_dict.get("param_groups", [])
        changed = settings_overridden_by_state(opt.param_groups, saved_groups, keys)
        if changed:
            report(describe_overrides(changed, len(opt.param_groups)))
        in_effect = dict(kwargs)
        for key in keys[:-1]:  # the settings, without initial_lr (not an optimizer_args key)
            values = [_as_given(g, key, scaled) for g in saved_groups if _group_key(g, key) in g]
            if values and (key in kwargs or any(not _same_setting(v, opt.defaults.get(key)) for v in values)):
                in_effect[key] = values[0] if all(_same_setting(v, values[0]) for v in values) else values
        text.in_effect = format_optimizer_args(in_effect)
        return None

    optimizer.register_load_state_dict_pre_hook(compare)
    return text


# --------------------------------------------------------------------------- sharded parameters


def install_shard_guard(optimizer: torch.optim.Optimizer) -> None:
    """Stop at the first ``step()`` if the parameters were flattened after construction.

    DeepSpeed ZeRO replaces each group's params with one flat 1-D fp32 partition, FSDP
    with flat parameters or 1-D views; SinkGD, Grams and OrthoGrad would then silently
    treat every weight as a vector. We remember each parameter's rank at construction
    and compare at the first step (a step pre-hook, so the optimizer's math is untouched).
    """
    ranks = {id(p): p.dim() for group in optimizer.param_groups for p in group["params"]}

    def check_once(opt, args, kwargs):
        handle.remove()
        problem = find_flat_shards(opt.param_groups, ranks)
        if problem:
            raise ShardedParamsError(
                f"{type(opt).__name__} needs each weight as a matrix, but {problem}: the parameters were "
                "flattened/sharded (DeepSpeed ZeRO or FSDP), which would silently disable SinkGD. "
                "Train without ZeRO/FSDP (DDP works), or choose another optimizer."
            )

    handle = optimizer.register_step_pre_hook(check_once)


def find_flat_shards(param_groups, ranks: dict[int, int]) -> str | None:
    """Describe the first parameter that looks like a flat shard, or None."""
    had_matrices = any(r >= 2 for r in ranks.values())
    for i, group in enumerate(param_groups):
        for p in group["params"]:
            kind = type(p).__name__
            if kind in ("FlatParameter", "DTensor") or getattr(p, "_is_flat_param", False) or hasattr(p, "ds_id"):
                return f"group {i} holds a {kind} (shape {tuple(p.shape)})"
            was = ranks.get(id(p))
            if was is not None and was >= 2 and p.dim() < 2:
                return f"a {was}-D weight of group {i} became {p.dim()}-D (shape {tuple(p.shape)})"
            if was is None and p.dim() == 1 and had_matrices:
                return f"group {i} now holds a 1-D tensor of {p.numel()} elements it was not built with"
    return None
