"""Make kohya sd-scripts use Automagic_Sinkgd by name, without editing sd-scripts.

``install()`` changes three things, each only for our optimizer; every other optimizer
goes through kohya's own code untouched:

* ``library.train_util.get_optimizer`` (kohya's factory, looked up as a module attribute
  by every trainer) builds Automagic_Sinkgd for ``--optimizer_type automagic_sinkgd``.
  That also bypasses kohya's "fused_backward_pass needs Adafactor" assertion for us only.
* ``library.adafactor_fused.patch_adafactor_fused`` (called by sdxl_train.py & co. under
  ``--fused_backward_pass``) leaves our optimizer its own ``step_param(p, group)``
  instead of grafting Adafactor's onto it.
* the ``log`` method of accelerate's trackers (TensorBoard, wandb, ...) adds
  ``lr/automagic_eff/<group>`` scalars (the average effective learning rate of each param
  group) to every log call that carries kohya's ``lr/<group>`` scalars. kohya only logs
  ``lr/d*lr/...`` for optimizers it names (DAdapt/Prodigy), and its log builders differ
  per script; the trackers are the one place every trainer goes through, and only on
  logged steps, so the host sync that reading the values needs happens only then.
  Each curve is named after its group as the network names it (see below).
* the ``prepare_optimizer_params*`` methods of the network modules (``networks.lora``,
  ``networks.lora_flux``, ``networks.lora_sd3``, ...) record the name the network gives each
  param group, keyed by the group's parameters, so the curves do not depend on the order
  or the uniqueness of kohya's ``lr/<name>`` keys.

kohya modules are patched when they are imported (a ``sys.meta_path`` finder), not
imported by us early: the trainer scripts do setup work (``init_ipex()``) before their
imports, and the launcher must run them exactly as the user would.
"""

from __future__ import annotations

import functools
import importlib.abc
import logging
import os
import re
import sys
import weakref
from typing import Any, Callable, Iterable

from .optimizer_factory import (
    OptimizerArgsError,
    ShardedParamsError,
    build_optimizer,
    describe_lora_scaling,
    is_automagic,
    kohya_lora_scale,
    parse_optimizer_args,
)

logger = logging.getLogger(__name__)

EFFECTIVE_LR_PREFIX = "lr/automagic_eff/"
KOHYA_DEFAULT_MAX_TRAIN_STEPS = 1600  # train_util's --max_train_steps default
_MARK = "__automagic_sinkgd_hook__"  # set on every function we wrap: makes install() idempotent

# Optimizers built through the hook, oldest first (weak: a finished run's optimizer may go away).
_built_optimizers: list[weakref.ReferenceType] = []


# --------------------------------------------------------------------------- get_optimizer


def kohya_build_optimizer(args, trainable_params) -> tuple[str, str, Any]:
    """Our branch of kohya's ``get_optimizer(args, trainable_params)``: same inputs, same triple."""
    if getattr(args, "use_8bit_adam", False) or getattr(args, "use_lion_optimizer", False):
        raise OptimizerArgsError(
            f"--optimizer_type {args.optimizer_type} cannot be combined with --use_8bit_adam / --use_lion_optimizer"
        )
    if getattr(args, "fused_backward_pass", False) and getattr(args, "gradient_accumulation_steps", 1) != 1:
        raise OptimizerArgsError("--fused_backward_pass needs --gradient_accumulation_steps 1 (kohya's own rule)")
    check_not_sharded_by_launch(args)
    kwargs = parse_optimizer_args(getattr(args, "optimizer_args", None))
    # The run's length as Automagic_Sinkgd's total_steps (unless the user set it). kohya turns
    # max_train_epochs into max_train_steps only after building the optimizer: this length is
    # provisional, and the scheduler wrapper below puts in the final one.
    steps = getattr(args, "max_train_steps", None) or KOHYA_DEFAULT_MAX_TRAIN_STEPS
    # A network trainer's LoRA scale (network_alpha / network_dim) as Automagic_Sinkgd's lora_scale,
    # which its lora_scale_power reads; the full fine-tune trainers' parsers have no network options.
    lora_scale = None
    if getattr(args, "network_module", None) or hasattr(args, "network_alpha"):
        lora_scale = kohya_lora_scale(getattr(args, "network_alpha", None), getattr(args, "network_dim", None))
    name, args_text, optimizer = build_optimizer(args.optimizer_type, trainable_params, args.learning_rate, kwargs,
                                                 run_length=steps, lora_scale=lora_scale)
    if hasattr(optimizer, "_run_length"):
        # Only train_network's parser has --initial_step: its resumed runs go on counting steps up to
        # max_train_steps. The fine-tune scripts (sdxl_train, flux_train, sd3_train, fine_tune,
        # train_db) count a resumed run from 0, so their max_train_steps is the steps still to go.
        optimizer._steps_restart_on_resume = not hasattr(args, "initial_step")
    # kohya's own wording ("use <type> | {kwargs}"), plus the class it resolved to
    logger.info(f"use {args.optimizer_type} | {kwargs} -> {name}")
    scaling = describe_lora_scaling(optimizer)
    if scaling:
        logger.info(scaling)
    _built_optimizers[:] = [ref for ref in _built_optimizers if ref() is not None] + [weakref.ref(optimizer)]
    return name, args_text, optimizer


def wrap_get_optimizer(original: Callable) -> Callable:
    if getattr(original, _MARK, False):
        return original

    @functools.wraps(original)
    def get_optimizer(args, trainable_params):
        if is_automagic(getattr(args, "optimizer_type", None)):
            return kohya_build_optimizer(args, trainable_params)
        return original(args, trainable_params)

    setattr(get_optimizer, _MARK, True)
    return get_optimizer


def check_not_sharded_by_launch(args) -> None:
    """Refuse DeepSpeed ZeRO / FSDP up front, before the model is wrapped.

    Both hand the optimizer flat 1-D shards of the weights, so SinkGD, Grams and
    OrthoGrad (which need each weight as a matrix) would silently fall back to the vector
    rule. The optimizer's own first-step check (optimizer_factory.install_shard_guard)
    catches the cases this cannot see.
    """
    zero_stage = getattr(args, "zero_stage", 2)
    if getattr(args, "deepspeed", False) and (zero_stage is None or zero_stage >= 1):
        raise ShardedParamsError(
            f"Automagic_Sinkgd does not support DeepSpeed ZeRO (--deepspeed, zero_stage={zero_stage}): ZeRO gives "
            "the optimizer flat 1-D shards, which would silently disable SinkGD. Train without --deepspeed "
            "(use --gradient_checkpointing / --full_bf16 / --fused_backward_pass to save memory)."
        )
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes"):
        raise ShardedParamsError(
            "Automagic_Sinkgd does not support FSDP (accelerate config distributed_type FSDP): FSDP gives the "
            "optimizer flattened 1-D shards, which would silently disable SinkGD. Use DDP (MULTI_GPU) instead."
        )


# --------------------------------------------------------------------------- fused backward


def _unwrap(optimizer):
    """The optimizer inside accelerate's AcceleratedOptimizer (or the optimizer itself)."""
    return getattr(optimizer, "optimizer", optimizer)


def has_own_step_param(optimizer) -> bool:
    return callable(getattr(type(_unwrap(optimizer)), "step_param", None))


def wrap_patch_adafactor_fused(original: Callable) -> Callable:
    if getattr(original, _MARK, False):
        return original

    @functools.wraps(original)
    def patch_adafactor_fused(optimizer):
        if not has_own_step_param(optimizer):
            return original(optimizer)  # Adafactor: kohya's own patch
        # kohya's gradient hook calls optimizer.step_param(tensor, group) on the object it
        # holds (accelerate's wrapper): expose our per-parameter step there.
        inner = _unwrap(optimizer)
        if optimizer is not inner:
            optimizer.step_param = inner.step_param

    setattr(patch_adafactor_fused, _MARK, True)
    return patch_adafactor_fused


# --------------------------------------------------------------------------- logging


# The name the network gave each param group, keyed by id() of the group's first parameter (the
# tensors outlive the group dicts, which torch replaces on load_state_dict); the weak reference
# guards against a recycled id.
_group_names: dict[int, tuple[weakref.ReferenceType, str]] = {}

# kohya's LoRA module names start with the part of the model they adapt
_LORA_FAMILY = re.compile(r"^lora_(te(\d*)|unet)_")


def lora_family(keys: Iterable[str]) -> str | None:
    """``textencoder N`` / ``textencoder`` / ``unet`` when every LoRA key of a group comes from that
    model part (``lora_te2_...`` -> ``textencoder 2``); None for mixed or unknown keys."""
    families = set()
    for key in keys:
        match = _LORA_FAMILY.match(key)
        if match is None:
            return None
        te, number = match.group(1), match.group(2)
        families.add("unet" if te == "unet" else f"textencoder {number}".strip())
    return families.pop() if len(families) == 1 else None


def network_group_names(descriptions: list[str], group_keys: list[list[str]]) -> list[str]:
    """One distinct name per param group, from the descriptions a kohya network returns with its groups.

    The descriptions are what kohya logs as ``lr/<description>``; whitespace is normalised
    (``"textencoder 1 "`` -> ``textencoder 1``). Two groups with the same description would share
    one curve: lora_sd3 describes CLIP-L and CLIP-G both as "textencoder 1 ". Such groups are named
    after the model part their LoRA keys belong to (``lora_te2_...`` -> ``textencoder 2``), keeping
    a LoRA+ "plus" suffix, and numbered by group when even that does not tell them apart.
    """
    names = [" ".join(str(d).split()) or f"group{i}" for i, d in enumerate(descriptions)]
    shared = {name for name in names if names.count(name) > 1}
    for i, name in enumerate(names):
        family = lora_family(group_keys[i]) if name in shared and i < len(group_keys) else None
        if family is not None:
            names[i] = family + (" plus" if name.endswith("plus") else "")
    shared = {name for name in names if names.count(name) > 1}
    return [f"{name} group{i}" if name in shared else name for i, name in enumerate(names)]


def _param_keys(params) -> list[str]:
    """The parameter names of a kohya group: its ``params`` is a ``dict.values()`` view of
    ``{"<lora_name>.<param>": tensor}``, whose ``mapping`` gives the keys back."""
    mapping = getattr(params, "mapping", None)
    return [str(k) for k in mapping] if mapping is not None else []


def _first_param(params):
    """The first tensor of a group's params without consuming it (lists and dict views only)."""
    if isinstance(params, (list, tuple)) or getattr(params, "mapping", None) is not None:
        return next(iter(params), None)
    return None


def remember_group_names(groups, descriptions) -> None:
    """Record the network's name for each of its param groups (see :func:`network_group_names`)."""
    if not isinstance(groups, (list, tuple)) or not isinstance(descriptions, (list, tuple)):
        return
    if len(groups) != len(descriptions) or not all(isinstance(g, dict) for g in groups):
        return
    names = network_group_names(list(descriptions), [_param_keys(g.get("params")) for g in groups])
    for group, name in zip(groups, names):
        first = _first_param(group.get("params"))
        if first is not None:
            _group_names[id(first)] = (weakref.ref(first), name)


def recorded_group_name(group: dict) -> str | None:
    """The name recorded for an optimizer param group, or None."""
    params = group.get("params") or []
    first = params[0] if len(params) else None
    entry = _group_names.get(id(first)) if first is not None else None
    return entry[1] if entry is not None and entry[0]() is first else None


def wrap_prepare_optimizer_params(original: Callable) -> Callable:
    """Wrap a network's ``prepare_optimizer_params*`` to record its group names (the result is unchanged)."""
    if getattr(original, _MARK, False):
        return original

    @functools.wraps(original)
    def prepare(*args, **kwargs):
        result = original(*args, **kwargs)
        if isinstance(result, tuple) and len(result) == 2:
            remember_group_names(*result)
        return result

    setattr(prepare, _MARK, True)
    return prepare


def patch_network_module(module) -> None:
    """Wrap ``prepare_optimizer_params*`` of every network class defined in a kohya network module."""
    import inspect

    for cls in vars(module).values():
        if not inspect.isclass(cls) or cls.__module__ != module.__name__:
            continue
        for method in ("prepare_optimizer_params", "prepare_optimizer_params_with_multiple_te_lrs"):
            if callable(vars(cls).get(method)):
                setattr(cls, method, wrap_prepare_optimizer_params(vars(cls)[method]))


def lr_names_in_logs(logs: dict) -> list[str]:
    """Group names kohya used for its ``lr/<name>`` scalars, in group order.

    Every kohya log builder writes ``lr/<name>`` for group 0, 1, ... first (then maybe
    repeats or adds ``lr/group<i>`` aliases), so the first N distinct plain names are the
    names of the N groups. ``lr/d*lr/...`` and our own scalars are skipped.
    """
    names: list[str] = []
    for key in logs:
        if key.startswith("lr/"):
            name = key[3:]
            if "/" not in name and "*" not in name and name not in names:
                names.append(name)
    return names


def effective_lr_logs(logs: dict, optimizers: Iterable) -> dict[str, float]:
    """``lr/automagic_eff/<group>`` scalars for a kohya log dict (empty if it has no ``lr/`` scalars)."""
    names = lr_names_in_logs(logs)
    if not names:
        return {}
    optimizers = [_unwrap(opt) for opt in optimizers]
    tensors = [t for opt in optimizers for t in opt.effective_lrs()]
    if not tensors:
        return {}
    # the network's own names when it recorded every group (LoRA trainers); else kohya's lr/ keys in
    # group order (the full fine-tune scripts name their groups unet, text_encoder1, ...)
    recorded = [recorded_group_name(g) for opt in optimizers for g in opt.param_groups]
    if len(recorded) == len(tensors) and all(recorded):
        names = recorded
    import torch

    values = torch.stack([t.detach().float().reshape(()) for t in tensors]).tolist()  # one host sync
    return {
        f"{EFFECTIVE_LR_PREFIX}{names[i] if i < len(names) else f'group{i}'}": v for i, v in enumerate(values)
    }


def logged_optimizers() -> list:
    """Optimizers built through the hook that report effective lrs, in build order
    (= kohya's group numbering, also with sdxl_train's one-optimizer-per-group mode)."""
    alive = (ref() for ref in _built_optimizers)
    return [o for o in alive if o is not None and callable(getattr(o, "effective_lrs", None))]


def wrap_tracker_log(original: Callable) -> Callable:
    """Wrap an accelerate tracker's ``log(values, step, ...)`` to add our scalars.

    Trackers, not ``Accelerator.log``: train_network.py and its subclasses call each
    tracker's ``log`` directly, the other scripts reach them through ``Accelerator.log``.
    """
    if getattr(original, _MARK, False):
        return original

    @functools.wraps(original)
    def log(self, values, *args, **kwargs):
        if isinstance(values, dict) and values:
            optimizers = logged_optimizers()
            if optimizers:
                values = {**values, **effective_lr_logs(values, optimizers)}
        return original(self, values, *args, **kwargs)

    setattr(log, _MARK, True)
    return log


def patch_trackers(tracking) -> None:
    """Wrap ``log`` of every tracker class accelerate ships (TensorBoard, wandb, ...)."""
    import inspect

    for cls in vars(tracking).values():
        if inspect.isclass(cls) and issubclass(cls, tracking.GeneralTracker) and "log" in vars(cls):
            cls.log = wrap_tracker_log(cls.log)


# --------------------------------------------------------------------------- installation


def wrap_get_scheduler_fix(original: Callable) -> Callable:
    """kohya's ``get_scheduler_fix(args, optimizer, ...)`` runs once ``args.max_train_steps`` is
    final (after ``max_train_epochs`` is turned into steps): give it to our optimizer as
    ``total_steps`` unless the user set it."""
    if getattr(original, _MARK, False):
        return original

    @functools.wraps(original)
    def get_scheduler_fix(args, optimizer, *rest, **kwargs):
        inner = _unwrap(optimizer)
        steps = getattr(args, "max_train_steps", None)
        if hasattr(inner, "_run_length") and steps:  # set by follow_run_length: the user gave no total_steps
            inner._run_length = int(steps)
            for group in inner.param_groups:
                group["total_steps"] = int(steps)
        return original(args, optimizer, *rest, **kwargs)

    setattr(get_scheduler_fix, _MARK, True)
    return get_scheduler_fix


def patch_train_util(train_util) -> None:
    train_util.get_optimizer = wrap_get_optimizer(train_util.get_optimizer)
    if hasattr(train_util, "get_scheduler_fix"):
        train_util.get_scheduler_fix = wrap_get_scheduler_fix(train_util.get_scheduler_fix)
    import accelerate.tracking  # already imported by train_util (through accelerate)

    patch_trackers(accelerate.tracking)


def patch_adafactor_fused_module(adafactor_fused) -> None:
    adafactor_fused.patch_adafactor_fused = wrap_patch_adafactor_fused(adafactor_fused.patch_adafactor_fused)


# A name ending in "." patches every module under that package (the --network_module choices).
KOHYA_PATCHES: dict[str, Callable] = {
    "library.train_util": patch_train_util,
    "library.adafactor_fused": patch_adafactor_fused_module,
    "networks.": patch_network_module,
}


def patch_for(name: str, patches: dict[str, Callable]) -> Callable | None:
    """The patch for module ``name``: by its exact name, or by a package prefix ending in "."."""
    if name in patches:
        return patches[name]
    return next((p for key, p in patches.items() if key.endswith(".") and name.startswith(key)), None)


class _PatchingLoader(importlib.abc.Loader):
    """Runs the real loader, then our patch on the fresh module."""

    def __init__(self, loader, patch: Callable):
        self._loader, self._patch = loader, patch

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._patch(module)

    def __getattr__(self, name):  # get_source, get_filename, ... for tracebacks and inspect
        return getattr(self._loader, name)


class PostImportPatcher(importlib.abc.MetaPathFinder):
    """Patch named modules right after they are first imported."""

    def __init__(self, patches: dict[str, Callable]):
        self.patches = patches

    def find_spec(self, fullname, path, target=None):
        patch = patch_for(fullname, self.patches)
        if patch is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _PatchingLoader(spec.loader, patch)
                return spec
        return None


def install(patches: dict[str, Callable] | None = None) -> None:
    """Activate the hook in this process (idempotent). Modules already imported are patched now."""
    patches = KOHYA_PATCHES if patches is None else patches
    for name, module in list(sys.modules.items()):
        patch = patch_for(name, patches)
        if patch is not None and module is not None:
            patch(module)
    if not any(isinstance(f, PostImportPatcher) and f.patches is patches for f in sys.meta_path):
        sys.meta_path.insert(0, PostImportPatcher(patches))
