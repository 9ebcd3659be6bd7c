"""lora_scale_power: the learning rates follow kohya's network_alpha / network_dim, so one preset
fits any LoRA scale. Off by default (the specified step); on, it must equal a run started with the
scaled learning rates by hand, bit for bit, in every state precision and across a resume."""
from argparse import Namespace

import pytest
import torch

from library import kohya_hook
from library.automagic_sinkgd import Automagic_Sinkgd, lora_scale_lr_factor
from library.kohya_hook import wrap_get_optimizer
from library.optimizer_factory import describe_lora_scaling, kohya_lora_scale


def test_factor_is_one_at_alpha_equal_rank_and_off_by_default():
    assert lora_scale_lr_factor(None, 0.0) == 1.0
    assert lora_scale_lr_factor(1 / 8, 0.0) == 1.0
    assert lora_scale_lr_factor(1.0, 1.0) == 1.0
    assert lora_scale_lr_factor(1 / 8, 1.0) == pytest.approx(8.0)
    assert lora_scale_lr_factor(16.0, 0.5) == pytest.approx(0.25)
    # a separate power above alpha = rank: 0 raises the lrs below it and keeps them above
    assert lora_scale_lr_factor(1 / 8, 1.0, 0.0) == pytest.approx(8.0)
    assert lora_scale_lr_factor(16.0, 1.0, 0.0) == 1.0
    assert lora_scale_lr_factor(16.0, 0.0, 1.0) == pytest.approx(1 / 16)


def test_kohya_lora_scale_follows_kohyas_defaults():
    assert kohya_lora_scale(None, None) == 1.0 / 4  # network_dim 4, network_alpha 1
    assert kohya_lora_scale(8.0, 16) == 0.5
    assert kohya_lora_scale(0.0, 32) == 1.0  # alpha 0: no scaling
    assert kohya_lora_scale(None, 8) == 1.0 / 8


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(12, 10, generator=g)), torch.nn.Parameter(torch.randn(10, generator=g))]


def _train(opt, params, steps, seed=1, start=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(start):
        for p in params:
            torch.randn(p.shape, generator=g)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()


# a mask that reaches its upper bound (large lr_bump, narrow range): a bound left unscaled shows
SETTINGS = dict(lr=2e-4, min_lr=1e-4, max_lr=4e-4, lr_bump=1e-4, warmup_steps=6, weight_decay=0.05)


def _scaled_by_hand(factor):
    return {k: (v * factor if k in ("lr", "min_lr", "max_lr", "lr_bump") else v) for k, v in SETTINGS.items()}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("scale,power,above", [(1 / 8, 1.0, 0.0), (16.0, 0.5, None)])
def test_scaled_run_equals_a_run_with_the_lrs_scaled_by_hand(precision, scale, power, above):
    factor = lora_scale_lr_factor(scale, power, above)
    a, b = _params(), _params()
    opt_a = Automagic_Sinkgd(a, **SETTINGS, lora_scale=scale, lora_scale_power=power,
                             lora_scale_power_above=above, state_precision=precision)
    opt_b = Automagic_Sinkgd(b, **_scaled_by_hand(factor), state_precision=precision)
    assert opt_a.param_groups[0]["lora_lr_factor"] == factor
    _train(opt_a, a, 12)
    _train(opt_b, b, 12)
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    assert (a[0] - _params()[0]).abs().max() > 0
    # the test sees every key: leaving the bounds unscaled gives another run
    c = _params()
    unscaled_bounds = dict(_scaled_by_hand(factor), min_lr=SETTINGS["min_lr"] * min(factor, 1),
                           max_lr=SETTINGS["max_lr"] * max(factor, 1) * 2)
    _train(Automagic_Sinkgd(c, **unscaled_bounds, state_precision=precision), c, 12)
    assert not torch.equal(a[0], c[0])


def test_default_power_leaves_the_step_untouched():
    a, b = _params(), _params()
    opt_a = Automagic_Sinkgd(a, **SETTINGS, lora_scale=1 / 8)  # scale given, power 0 (default)
    opt_b = Automagic_Sinkgd(b, **SETTINGS)
    _train(opt_a, a, 10)
    _train(opt_b, b, 10)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert opt_a.param_groups[0]["lr"] == SETTINGS["lr"]


def test_resume_does_not_scale_twice():
    full, half = _params(), _params()
    kwargs = dict(SETTINGS, lora_scale=0.25, lora_scale_power=1.0)
    opt_full = Automagic_Sinkgd(full, **kwargs)
    _train(opt_full, full, 10)
    opt_half = Automagic_Sinkgd(half, **kwargs)
    _train(opt_half, half, 5)
    saved = opt_half.state_dict()
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in half]
    resumed = Automagic_Sinkgd(resumed_params, **kwargs)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["lr"] == pytest.approx(SETTINGS["lr"] * 4)
    _train(resumed, resumed_params, 5, start=5)
    assert all(torch.equal(x, y) for x, y in zip(full, resumed_params))


@pytest.mark.parametrize("kwargs,message", [
    (dict(lora_scale_power=1.0), "lora_scale_power=1.0 is out of range; allowed: 0 without lora_scale"),
    (dict(lora_scale=0.5, lora_scale_power=1.5), "lora_scale_power=1.5 is out of range; allowed: a number in [0, 1]"),
    (dict(lora_scale=0.0, lora_scale_power=1.0), "lora_scale=0.0 is out of range; allowed: None or a number > 0"),
    (dict(lora_scale=float("inf")), "lora_scale=inf is out of range"),
    (dict(lora_scale_power_above=1.0), "lora_scale_power_above=1.0 is out of range; allowed: 0 without lora_scale"),
    (dict(lora_scale=2.0, lora_scale_power_above=-1), "lora_scale_power_above=-1 is out of range; allowed: None"),
])
def test_bad_settings_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        Automagic_Sinkgd(_params(), lr=1e-4, **kwargs)


# --------------------------------------------------------------------------- kohya glue


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    monkeypatch.setattr(kohya_hook, "_built_optimizers", [])


def _kohya_args(**overrides):
    values = dict(optimizer_type="automagic_sinkgd", optimizer_args=["lora_scale_power=1.0", "min_lr=1e-6"],
                  learning_rate=5e-5, use_8bit_adam=False, use_lion_optimizer=False, fused_backward_pass=False,
                  gradient_accumulation_steps=1, deepspeed=False, max_train_steps=100,
                  network_module="networks.lora", network_dim=16, network_alpha=2.0)
    values.update(overrides)
    return Namespace(**values)


def _groups():
    return [{"params": list(torch.nn.Linear(6, 4).parameters()), "lr": 5e-5}]


def test_kohya_network_trainer_passes_alpha_over_dim():
    _, args_text, opt = wrap_get_optimizer(lambda a, p: None)(_kohya_args(), _groups())
    group = opt.param_groups[0]
    assert group["lora_scale"] == 2.0 / 16 and group["lora_lr_factor"] == pytest.approx(8.0)
    assert group["lr"] == pytest.approx(4e-4) and group["mask_min_lr"] == pytest.approx(8e-6)
    assert args_text == "lora_scale_power=1.0,min_lr=1e-06"  # the user's own arguments
    # after a resume, the args text (kohya's ss_optimizer metadata) still shows the values as given
    saved = opt.state_dict()
    _, resumed_text, resumed = wrap_get_optimizer(lambda a, p: None)(_kohya_args(), _groups())
    resumed.load_state_dict(saved)
    assert str(resumed_text) == "lora_scale_power=1.0,min_lr=1e-06"


def _full_trainer_args(**overrides):
    """A full fine-tune trainer's args: its parser has none of the network options."""
    args = _kohya_args(**overrides)
    for name in ("network_module", "network_dim", "network_alpha"):
        delattr(args, name)
    return args


def test_the_scaling_is_said_in_one_line(caplog):
    import logging

    with caplog.at_level(logging.INFO, logger="library.kohya_hook"):
        _, _, opt = wrap_get_optimizer(lambda a, p: None)(_kohya_args(), _groups())
    lines = [r.getMessage() for r in caplog.records if "network_alpha / network_dim" in r.getMessage()]
    assert lines == [describe_lora_scaling(opt)]
    assert "= 0.125: learning rates x8 " in lines[0] and "now 0.0004" in lines[0]
    plain = wrap_get_optimizer(lambda a, p: None)(_kohya_args(optimizer_args=["min_lr=1e-6"]), _groups())[2]
    assert describe_lora_scaling(plain) is None


def test_kohya_full_trainer_has_no_lora_scale():
    _, _, opt = wrap_get_optimizer(lambda a, p: None)(_full_trainer_args(optimizer_args=["min_lr=1e-6"]), _groups())
    assert opt.param_groups[0]["lora_scale"] is None and opt.param_groups[0]["lr"] == 5e-5
    # a LoRA-scaled preset on a full trainer says what is missing before training
    with pytest.raises(ValueError, match="lora_scale_power"):
        wrap_get_optimizer(lambda a, p: None)(_full_trainer_args(), _groups())


def test_kohya_network_trainer_without_network_options_uses_kohyas_defaults():
    args = _kohya_args(network_module=None, network_dim=None, network_alpha=None)
    _, _, opt = wrap_get_optimizer(lambda a, p: None)(args, _groups())
    assert opt.param_groups[0]["lora_scale"] == 1 / 4  # dim 4, alpha 1


def test_users_own_lora_scale_wins():
    args = _kohya_args(optimizer_args=["lora_scale_power=1.0", "lora_scale=1.0"])
    _, _, opt = wrap_get_optimizer(lambda a, p: None)(args, _groups())
    assert opt.param_groups[0]["lr"] == 5e-5


def test_builtin_trainer_passes_its_lora_scale(tmp_path, monkeypatch, capsys):
    from builtin_fixtures import base_args, build_dataset, build_tiny_pipeline
    from library.builtin.trainer import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, data = build_tiny_pipeline(tmp_path / "model"), build_dataset(tmp_path / "data")
    automagic = ["--optimizer_type", "automagic_sinkgd", "--learning_rate", "1e-4", "--save_state",
                 "--optimizer_args", "warmup_steps=1", "lora_scale_power=1.0"]
    # base_args trains network_dim 2, network_alpha 1: lora_scale 0.5, every lr doubled
    assert main(base_args(model, data, tmp_path / "a", 2) + automagic) == 0
    saved = torch.load(tmp_path / "a" / "tiny-state" / "optimizer.bin", weights_only=True)
    assert {g["lora_scale"] for g in saved["param_groups"]} == {0.5}
    assert "network_alpha / network_dim = 0.5: learning rates x2 " in capsys.readouterr().out
    assert [g["initial_lr"] for g in saved["param_groups"]] == pytest.approx([2e-4] * len(saved["param_groups"]))
