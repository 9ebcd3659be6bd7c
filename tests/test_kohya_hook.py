"""The kohya hook without sd-scripts: get_optimizer routing, import-time patching, logging, fused backward."""

import copy
import sys
from argparse import Namespace

import pytest
import torch

from library import kohya_hook
from library.automagic_sinkgd import Automagic_Sinkgd
from library.kohya_hook import (
    EFFECTIVE_LR_PREFIX,
    effective_lr_logs,
    install,
    lr_names_in_logs,
    patch_adafactor_fused_module,
    patch_train_util,
    wrap_get_optimizer,
    wrap_patch_adafactor_fused,
    wrap_tracker_log,
)
from library.optimizer_factory import OptimizerArgsError, ShardedParamsError

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    monkeypatch.setattr(kohya_hook, "_built_optimizers", [])


def kohya_args(**overrides):
    """The attributes of kohya's args that get_optimizer reads."""
    values = dict(optimizer_type="automagic_sinkgd", optimizer_args=None, learning_rate=1e-4, use_8bit_adam=False,
                  use_lion_optimizer=False, fused_backward_pass=False, gradient_accumulation_steps=1, deepspeed=False)
    values.update(overrides)
    return Namespace(**values)


def lora_like_groups():
    te, unet = torch.nn.Linear(6, 4), torch.nn.Linear(8, 6)
    return [{"params": dict(te.named_parameters()).values(), "lr": 5e-5},
            {"params": dict(unet.named_parameters()).values(), "lr": 1e-4}]


def kohya_original(args, trainable_params):
    """Stand-in for kohya's get_optimizer: records that it was used."""
    return "kohya", args.optimizer_type, None


# ---------------------------------------------------------------- get_optimizer


def test_ours_is_built_from_kohyas_arguments():
    get_optimizer = wrap_get_optimizer(kohya_original)
    args = kohya_args(optimizer_type="Automagic_Sinkgd", optimizer_args=["warmup_steps=9", "orthograd=True"])
    name, args_text, opt = get_optimizer(args, lora_like_groups())
    assert type(opt) is Automagic_Sinkgd and name.endswith("automagic_sinkgd.Automagic_Sinkgd")
    assert args_text == "warmup_steps=9,orthograd=True"
    assert [g["lr"] for g in opt.param_groups] == [5e-5, 1e-4]
    assert opt.defaults["lr"] == 1e-4 and opt.defaults["warmup_steps"] == 9


@pytest.mark.parametrize("name", ["AdamW", "adafactor", "Prodigy", "AdamW8bit", None, "some.module.Automagic_Sinkgd"])
def test_every_other_optimizer_goes_to_kohya_untouched(name):
    # including Adafactor with --fused_backward_pass: kohya's own assertion path runs
    args = kohya_args(optimizer_type=name, fused_backward_pass=True)
    assert wrap_get_optimizer(kohya_original)(args, []) == ("kohya", name, None)


def test_fused_backward_pass_is_allowed_for_ours_but_not_with_accumulation():
    get_optimizer = wrap_get_optimizer(kohya_original)
    assert get_optimizer(kohya_args(fused_backward_pass=True), lora_like_groups())[2] is not None
    with pytest.raises(OptimizerArgsError, match="gradient_accumulation_steps 1"):
        get_optimizer(kohya_args(fused_backward_pass=True, gradient_accumulation_steps=2), lora_like_groups())


def test_typo_in_optimizer_args_is_caught():
    with pytest.raises(OptimizerArgsError, match="did you mean 'stats_update_freq'"):
        wrap_get_optimizer(kohya_original)(kohya_args(optimizer_args=["stats_update_frq=3"]), lora_like_groups())


def test_conflicting_kohya_flags():
    with pytest.raises(OptimizerArgsError, match="use_8bit_adam"):
        wrap_get_optimizer(kohya_original)(kohya_args(use_8bit_adam=True), lora_like_groups())


def test_deepspeed_zero_and_fsdp_are_refused_up_front(monkeypatch):
    get_optimizer = wrap_get_optimizer(kohya_original)
    with pytest.raises(ShardedParamsError, match="DeepSpeed ZeRO"):
        get_optimizer(kohya_args(deepspeed=True, zero_stage=2), lora_like_groups())
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ShardedParamsError, match="FSDP"):
        get_optimizer(kohya_args(), lora_like_groups())


def test_wrapping_twice_is_a_no_op():
    once = wrap_get_optimizer(kohya_original)
    assert wrap_get_optimizer(once) is once


# ---------------------------------------------------------------- import-time patching


@pytest.fixture
def fake_kohya(tmp_path, monkeypatch):
    """A package laid out like kohya's library/, under a name that cannot clash."""
    pkg = tmp_path / "fake_kohya_lib"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "train_util.py").write_text(
        "def get_optimizer(args, trainable_params):\n    return 'kohya', args.optimizer_type, None\n"
    )
    (pkg / "adafactor_fused.py").write_text("def patch_adafactor_fused(optimizer):\n    optimizer.adafactor = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import accelerate.tracking

    for cls in vars(accelerate.tracking).values():  # restore the trackers after the test
        if isinstance(cls, type) and "log" in vars(cls):
            monkeypatch.setattr(cls, "log", vars(cls)["log"])
    patches = {"fake_kohya_lib.train_util": patch_train_util, "fake_kohya_lib.adafactor_fused": patch_adafactor_fused_module}
    yield patches
    sys.meta_path[:] = [f for f in sys.meta_path if getattr(f, "patches", None) is not patches]
    for name in [n for n in sys.modules if n.startswith("fake_kohya_lib")]:
        del sys.modules[name]


def test_modules_are_patched_when_kohya_imports_them(fake_kohya):
    install(fake_kohya)
    install(fake_kohya)  # idempotent: one finder
    assert sum(getattr(f, "patches", None) is fake_kohya for f in sys.meta_path) == 1
    from fake_kohya_lib import train_util  # imported after install, as the trainer script does

    assert train_util.get_optimizer(kohya_args(optimizer_type="AdamW"), []) == ("kohya", "AdamW", None)
    assert type(train_util.get_optimizer(kohya_args(), lora_like_groups())[2]) is Automagic_Sinkgd
    import accelerate.tracking

    assert getattr(accelerate.tracking.TensorBoardTracker.log, "__automagic_sinkgd_hook__", False)


def test_modules_imported_before_install_are_patched_too(fake_kohya):
    import fake_kohya_lib.adafactor_fused as adafactor_fused

    install(fake_kohya)
    assert getattr(adafactor_fused.patch_adafactor_fused, "__automagic_sinkgd_hook__", False)


# ---------------------------------------------------------------- logging


def stepped_optimizer(steps=2, groups=None):
    _, _, opt = wrap_get_optimizer(kohya_original)(kohya_args(optimizer_args=["warmup_steps=4"]), groups or lora_like_groups())
    for _ in range(steps):
        for group in opt.param_groups:
            for p in group["params"]:
                p.grad = torch.randn_like(p)
        opt.step()
    return opt


def test_group_names_come_from_kohyas_lr_scalars():
    # train_network.generate_step_logs: lr/<desc> per group, then its for-else adds aliases
    logs = {"loss/current": 0.1, "lr/textencoder": 1e-4, "lr/unet": 1e-4, "lr/group1": 1e-4}
    assert lr_names_in_logs(logs)[:2] == ["textencoder", "unet"]
    # train_util.append_lr_to_logs (fine_tune.py, train_db.py, sdxl_train.py)
    logs = {"loss/current": 0.1, "lr/unet": 1e-5, "lr/text_encoder1": 1e-5, "lr/d*lr/unet": 1.0}
    assert lr_names_in_logs(logs) == ["unet", "text_encoder1"]


def test_effective_lr_scalars_match_the_optimizer():
    opt = stepped_optimizer()
    logs = {"loss/current": 0.1, "lr/textencoder": 5e-5, "lr/unet": 1e-4, "lr/group1": 1e-4}
    extra = effective_lr_logs(logs, [opt])
    expected = [float(t) for t in opt.effective_lrs()]
    assert extra == {f"{EFFECTIVE_LR_PREFIX}textencoder": pytest.approx(expected[0]),
                     f"{EFFECTIVE_LR_PREFIX}unet": pytest.approx(expected[1])}
    assert all(isinstance(v, float) for v in extra.values())
    assert effective_lr_logs({"loss/epoch": 0.1}, [opt]) == {}  # epoch logs carry no lr scalars


def test_several_single_group_optimizers_are_numbered_in_order():
    # sdxl_train --fused_optimizer_groups: one optimizer per group, only lr/unet logged
    first, second = stepped_optimizer(1), stepped_optimizer(1)
    extra = effective_lr_logs({"lr/unet": 1e-4}, [first, second])
    assert list(extra) == [f"{EFFECTIVE_LR_PREFIX}unet", f"{EFFECTIVE_LR_PREFIX}group1",
                           f"{EFFECTIVE_LR_PREFIX}group2", f"{EFFECTIVE_LR_PREFIX}group3"]


# The LoRA layouts of kohya's networks: (module names of each param group, the description the
# network returns for it). networks.lora trains SD1.x with one text encoder (lora_te_) and SDXL with
# both in one group (lora_te1_ / lora_te2_); lora_flux names CLIP-L "textencoder 1 "; lora_sd3 names
# CLIP-L and CLIP-G both "textencoder 1 " (sd-scripts 48d368fa).
LORA_LAYOUTS = {
    "sd15": ([["lora_te_text_model_encoder_layers_0_mlp_fc1"], ["lora_unet_down_blocks_0_attentions_0_proj_in"]],
             ["textencoder", "unet"], ["textencoder", "unet"]),
    "sdxl": ([["lora_te1_text_model_encoder_layers_0_mlp_fc1", "lora_te2_text_model_encoder_layers_0_mlp_fc1"],
              ["lora_unet_input_blocks_4_1_proj_in"]],
             ["textencoder", "unet"], ["textencoder", "unet"]),
    "flux": ([["lora_te1_text_model_encoder_layers_0_mlp_fc1"], ["lora_unet_double_blocks_0_img_attn_qkv"]],
             ["textencoder 1 ", "unet"], ["textencoder 1", "unet"]),
    "sd3": ([["lora_te1_text_model_encoder_layers_0_mlp_fc1"], ["lora_te2_text_model_encoder_layers_0_mlp_fc1"],
             ["lora_unet_joint_blocks_0_x_block_attn_qkv"]],
            ["textencoder 1 ", "textencoder 1 ", "unet"], ["textencoder 1", "textencoder 2", "unet"]),
}


def fake_network_module(layout):
    """A module shaped like networks.lora*: a network class whose prepare method returns kohya's groups
    ({"params": dict.values() of {"<lora_name>.<param>": tensor}, "lr": ...}) and their descriptions."""
    import types

    module = types.ModuleType("fake_networks.lora_layout")
    modules, descriptions, _ = LORA_LAYOUTS[layout]

    class LoRANetwork:
        def prepare_optimizer_params_with_multiple_te_lrs(self, text_encoder_lr, unet_lr, default_lr):
            torch.manual_seed(0)
            groups = []
            for index, names in enumerate(modules):
                params = {}
                for name in names:
                    params[f"{name}.lora_down.weight"] = torch.nn.Parameter(torch.randn(4, 8))
                    params[f"{name}.lora_up.weight"] = torch.nn.Parameter(torch.randn(8, 4) * 0.1)
                groups.append({"params": params.values(), "lr": [1e-5, 2e-5, 1e-4][index]})
            return groups, list(descriptions)

    LoRANetwork.__module__ = module.__name__
    module.LoRANetwork = LoRANetwork
    return module


def kohya_step_logs(descriptions, lrs):
    """train_network.generate_step_logs: lr/<description> per group, in group order (a repeated
    description keeps its first position and the later group's value)."""
    logs = {"loss/current": 0.1, "loss/average": 0.1}
    for description, lr in zip(descriptions, lrs):
        logs[f"lr/{description}"] = lr
    return logs


@pytest.mark.parametrize("layout", sorted(LORA_LAYOUTS))
def test_effective_lr_curves_carry_the_networks_own_group_names(layout):
    module = fake_network_module(layout)
    kohya_hook.patch_network_module(module)
    groups, descriptions = module.LoRANetwork().prepare_optimizer_params_with_multiple_te_lrs(None, None, 1e-4)
    opt = stepped_optimizer(2, groups)
    expected = LORA_LAYOUTS[layout][2]
    values = [float(t) for t in opt.effective_lrs()]
    assert len(set(values)) == len(values)  # groups at 1e-5 / 2e-5 / 1e-4: a swapped name shows
    for _ in range(2):  # also after a resume: torch's load_state_dict replaces the group dicts
        extra = effective_lr_logs(kohya_step_logs(descriptions, [g["lr"] for g in opt.param_groups]), [opt])
        assert extra == {f"{EFFECTIVE_LR_PREFIX}{name}": pytest.approx(v) for name, v in zip(expected, values)}
        opt.load_state_dict(copy.deepcopy(opt.state_dict()))


def test_group_names_that_stay_ambiguous_are_numbered():
    names = kohya_hook.network_group_names(["unet", "unet plus", "unet", "textencoder"],
                                           [["lora_unet_a.w"], ["lora_unet_a.w"], ["other.w"], []])
    assert names == ["unet group0", "unet plus", "unet group2", "textencoder"]
    assert kohya_hook.lora_family(["lora_te2_x.lora_up.weight", "lora_te2_y.alpha"]) == "textencoder 2"
    assert kohya_hook.lora_family(["lora_te1_x.w", "lora_te2_y.w"]) is None


def test_network_modules_are_patched_on_import(tmp_path, monkeypatch):
    pkg = tmp_path / "fake_networks_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "lora_sd3.py").write_text(
        "import torch\n"
        "class LoRANetwork:\n"
        "    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr):\n"
        "        p = {'lora_te2_x.lora_up.weight': torch.nn.Parameter(torch.zeros(2, 2))}\n"
        "        return [{'params': p.values()}], ['textencoder 1 ']\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    patches = {"fake_networks_pkg.": kohya_hook.patch_network_module}
    install(patches)
    try:
        import fake_networks_pkg.lora_sd3 as network_module

        groups, _ = network_module.LoRANetwork().prepare_optimizer_params(None, None, 1e-4)
        assert kohya_hook.recorded_group_name({"params": list(groups[0]["params"])}) == "textencoder 1"
    finally:
        sys.meta_path[:] = [f for f in sys.meta_path if getattr(f, "patches", None) is not patches]
        for name in [n for n in sys.modules if n.startswith("fake_networks_pkg")]:
            del sys.modules[name]


class RecordingTracker:
    def __init__(self):
        self.calls = []

    def log(self, values, step=None, **kwargs):
        self.calls.append((dict(values), step))


def test_tracker_log_adds_scalars_only_when_called(monkeypatch):
    opt = stepped_optimizer(0)
    reads = []
    original = opt.effective_lrs
    monkeypatch.setattr(opt, "effective_lrs", lambda: reads.append(1) or original())
    for group in opt.param_groups:  # steps that are not logged never read the effective lrs
        for p in group["params"]:
            p.grad = torch.ones_like(p)
    opt.step()
    opt.step()
    assert reads == []
    monkeypatch.setattr(RecordingTracker, "log", wrap_tracker_log(RecordingTracker.log))
    tracker = RecordingTracker()
    logs = {"loss/current": 0.5, "lr/textencoder": 5e-5, "lr/unet": 1e-4}
    tracker.log(logs, step=2)
    assert reads == [1]
    values, step = tracker.calls[0]
    assert step == 2 and {f"{EFFECTIVE_LR_PREFIX}textencoder", f"{EFFECTIVE_LR_PREFIX}unet"} <= set(values)
    assert logs == {"loss/current": 0.5, "lr/textencoder": 5e-5, "lr/unet": 1e-4}  # caller's dict untouched


def test_real_tensorboard_tracker_receives_the_scalars(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    import accelerate.tracking
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setattr(accelerate.tracking.TensorBoardTracker, "log",
                        wrap_tracker_log(accelerate.tracking.TensorBoardTracker.log))
    opt = stepped_optimizer(2)  # noqa: F841 - kept alive, as kohya keeps its optimizer
    tracker = accelerate.tracking.TensorBoardTracker("run", str(tmp_path))
    if hasattr(tracker, "start"):  # newer accelerate opens the writer in start()
        tracker.start()
    tracker.log({"loss/current": 0.5, "lr/textencoder": 5e-5, "lr/unet": 1e-4}, step=2)
    tracker.finish()
    events = EventAccumulator(str(tmp_path / "run"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert f"{EFFECTIVE_LR_PREFIX}unet" in tags and f"{EFFECTIVE_LR_PREFIX}textencoder" in tags
    assert events.Scalars(f"{EFFECTIVE_LR_PREFIX}unet")[0].step == 2


# ---------------------------------------------------------------- fused backward pass


class AcceleratedLike:
    """What kohya holds after accelerator.prepare: a wrapper with .optimizer and shared param_groups."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    @property
    def param_groups(self):
        return self.optimizer.param_groups


def register_kohya_fused_hooks(optimizer):
    """The gradient hooks sdxl_train.py registers under --fused_backward_pass."""
    for param_group in optimizer.param_groups:
        for parameter in param_group["params"]:
            if parameter.requires_grad:
                def grad_hook(tensor, param_group=param_group):
                    optimizer.step_param(tensor, param_group)
                    tensor.grad = None

                parameter.register_post_accumulate_grad_hook(grad_hook)


def small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Tanh(), torch.nn.Linear(6, 4))


def train(model, step_fn, steps=4):
    torch.manual_seed(1)
    for _ in range(steps):
        x = torch.randn(5, 8)
        loss = model(x).pow(2).mean()
        loss.backward()
        step_fn()


def test_fused_backward_pass_steps_each_parameter_from_its_hook():
    reference, fused = small_model(), small_model()
    optimizer_args = ["weight_decay=0.0", "warmup_steps=3", "full_finetune=True"]
    args = kohya_args(fused_backward_pass=True, optimizer_args=optimizer_args)
    get_optimizer = wrap_get_optimizer(kohya_original)
    ref_opt = get_optimizer(args, [{"params": list(reference.parameters()), "lr": 1e-3}])[2]
    opt = AcceleratedLike(get_optimizer(args, [{"params": list(fused.parameters()), "lr": 1e-3}])[2])

    adafactor_patch_used = []
    wrap_patch_adafactor_fused(adafactor_patch_used.append)(opt)
    assert adafactor_patch_used == []  # kohya's Adafactor patch is not applied to ours
    register_kohya_fused_hooks(opt)

    def reference_step():
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)

    train(reference, reference_step)
    train(fused, lambda: None)  # no optimizer.step(): the hooks did it
    start = small_model()
    for p_ref, p_fused, p_start in zip(reference.parameters(), fused.parameters(), start.parameters()):
        assert p_fused.grad is None
        assert not torch.equal(p_fused, p_start)
        torch.testing.assert_close(p_fused, p_ref, rtol=1e-5, atol=1e-7)
    assert all(opt.optimizer.state[p]["step"] == 4 for p in fused.parameters())


def test_fused_backward_pass_with_group_statistics_trains():
    model = small_model()
    start = copy.deepcopy(model)
    args = kohya_args(fused_backward_pass=True, optimizer_args=["warmup_steps=6", "stats_update_freq=2"])
    opt = wrap_get_optimizer(kohya_original)(args, [{"params": list(model.parameters()), "lr": 1e-3}])[2]
    wrap_patch_adafactor_fused(lambda o: pytest.fail("Adafactor patch applied"))(opt)
    register_kohya_fused_hooks(opt)
    train(model, lambda: None, steps=5)
    for p, p0 in zip(model.parameters(), start.parameters()):
        assert torch.isfinite(p).all() and not torch.equal(p, p0)


def test_adafactor_still_gets_kohyas_fused_patch():
    transformers = pytest.importorskip("transformers")
    adafactor = transformers.optimization.Adafactor([torch.nn.Parameter(torch.ones(2, 2))], lr=1e-3,
                                                    relative_step=False, scale_parameter=False)
    used = []
    wrap_patch_adafactor_fused(used.append)(AcceleratedLike(adafactor))
    assert len(used) == 1
