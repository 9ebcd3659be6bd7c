"""Optimizer factory: kohya's optimizer_args syntax, names, keyword checks, sharded-parameter guard."""

import inspect

import pytest
import torch

from library.automagic_sinkgd import Automagic_Sinkgd
from library.optimizer_factory import (
    OptimizerArgsError,
    ShardedParamsError,
    build_optimizer,
    format_optimizer_args,
    is_automagic,
    parse_optimizer_args,
    valid_keywords,
)

torch.set_num_threads(1)


# ---------------------------------------------------------------- parse_optimizer_args


def test_values_are_python_literals_as_in_kohya():
    parsed = parse_optimizer_args(
        ["min_lr=1e-6", "warmup_steps=500", "orthograd=True", "betas=0.9,0.99", "tag='x'", "sinkgd_iters=None"]
    )
    assert parsed == {
        "min_lr": 1e-6,
        "warmup_steps": 500,
        "orthograd": True,
        "betas": (0.9, 0.99),
        "tag": "x",
        "sinkgd_iters": None,
    }
    assert isinstance(parsed["warmup_steps"], int) and parsed["orthograd"] is True


def test_spaces_around_key_and_value_are_ignored():
    # kohya would make "warmup_steps " the key; the user meant warmup_steps
    assert parse_optimizer_args(["warmup_steps = 10"]) == {"warmup_steps": 10}


def test_a_single_string_is_split_like_a_shell():
    assert parse_optimizer_args("eta=2.0 orthograd=False") == {"eta": 2.0, "orthograd": False}
    assert parse_optimizer_args(None) == {} and parse_optimizer_args([]) == {}


@pytest.mark.parametrize(
    "item, needle",
    [
        ("orthograd=true", "True/False"),  # not a literal
        ("tag=x", "quote strings"),
        ("warmup_steps", "key=value"),  # no "="
        ("=3", "key=value"),
        ("min-lr=1", "key=value"),  # not an identifier
    ],
)
def test_bad_items_say_how_to_write_them(item, needle):
    with pytest.raises(OptimizerArgsError, match=needle):
        parse_optimizer_args([item])


def test_a_key_given_twice_is_an_error():
    with pytest.raises(OptimizerArgsError, match="given twice"):
        parse_optimizer_args(["eta=1", "eta=2"])


# ---------------------------------------------------------------- names


@pytest.mark.parametrize(
    "name",
    [
        "automagic_sinkgd",
        "Automagic_Sinkgd",
        "AUTOMAGIC_SINKGD",
        " automagic_sinkgd ",
        "library.automagic_sinkgd.Automagic_Sinkgd",
        "automagic_sinkgd_plugin.automagic_sinkgd.Automagic_Sinkgd",
    ],
)
def test_our_names(name):
    assert is_automagic(name)


@pytest.mark.parametrize("name", [None, "", "AdamW", "Adafactor", "prodigy", "other_pkg.Automagic_Sinkgd", "automagic"])
def test_other_names_are_left_to_kohya(name):
    assert not is_automagic(name)


# ---------------------------------------------------------------- build_optimizer


def _kohya_groups():
    """Shaped like kohya's LoRA groups: dict_values params, each group with its own lr."""
    te, unet = torch.nn.Linear(6, 4), torch.nn.Linear(8, 6)
    te_params = {n: p for n, p in te.named_parameters()}
    unet_params = {n: p for n, p in unet.named_parameters()}
    return [{"params": te_params.values(), "lr": 2e-5}, {"params": unet_params.values(), "lr": 1e-4}]


def test_builds_ours_with_kohya_groups_and_returns_kohyas_triple():
    name, args_text, opt = build_optimizer("automagic_sinkgd", _kohya_groups(), 5e-5, ["warmup_steps=7", "eta=3.0"])
    assert type(opt) is Automagic_Sinkgd
    # kohya stores ss_optimizer = f"{name}({args_text})"
    assert name == f"{Automagic_Sinkgd.__module__}.Automagic_Sinkgd"
    assert args_text == "warmup_steps=7,eta=3.0"
    assert [g["lr"] for g in opt.param_groups] == [2e-5, 1e-4]  # each group's own lr kept
    assert all(g["warmup_steps"] == 7 and g["eta"] == 3.0 for g in opt.param_groups)
    assert opt.defaults["lr"] == 5e-5


def test_group_lr_is_the_start_of_its_mask():
    _, _, opt = build_optimizer("automagic_sinkgd", _kohya_groups(), 5e-5, [])
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.randn_like(p)
    opt.step()
    lrs = [float(opt.state[g["params"][0]]["avg_lr"]) for g in opt.param_groups]
    assert lrs == pytest.approx([2e-5, 1e-4])


def test_dotted_path_to_a_missing_copy_falls_back_to_ours():
    # "library.automagic_sinkgd.Automagic_Sinkgd" is the copy-into-sd-scripts route; without the copy, ours serves
    _, _, opt = build_optimizer("no_copy_here.automagic_sinkgd.Automagic_Sinkgd", _kohya_groups(), 1e-5)
    assert type(opt) is Automagic_Sinkgd


def test_optimizer_args_may_be_a_mapping():
    _, args_text, opt = build_optimizer("automagic_sinkgd", [torch.nn.Parameter(torch.ones(2, 2))], 1e-5, {"beta1": 0.8})
    assert opt.defaults["beta1"] == 0.8 and args_text == "beta1=0.8"


def test_unknown_key_lists_valid_keys_and_closest_match():
    with pytest.raises(OptimizerArgsError) as info:
        build_optimizer("automagic_sinkgd", _kohya_groups(), 1e-5, ["warmup_step=10"])
    message = str(info.value)
    assert "'warmup_step'" in message and "did you mean 'warmup_steps'" in message
    for key in ("min_lr", "max_lr", "stats_update_freq", "orthograd"):
        assert key in message


def test_lr_in_optimizer_args_points_to_learning_rate():
    with pytest.raises(OptimizerArgsError, match="--learning_rate"):
        build_optimizer("automagic_sinkgd", _kohya_groups(), 1e-5, ["lr=1e-3"])


def test_bad_value_is_the_optimizers_own_error():
    with pytest.raises(ValueError, match="warmup_steps"):
        build_optimizer("automagic_sinkgd", _kohya_groups(), 1e-5, ["warmup_steps=0"])


def test_valid_keywords_follow_the_signature():
    expected = [n for n in inspect.signature(Automagic_Sinkgd.__init__).parameters if n not in ("self", "params")]
    assert valid_keywords(Automagic_Sinkgd) == expected


def test_other_optimizers():
    params = [torch.nn.Parameter(torch.ones(3))]
    name, args_text, opt = build_optimizer("AdamW", params, 1e-3, ["weight_decay=0.1", "betas=0.8,0.9"])
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["betas"] == (0.8, 0.9)
    assert name == "torch.optim.adamw.AdamW" and args_text == "weight_decay=0.1,betas=(0.8, 0.9)"
    assert isinstance(build_optimizer("sgd", params, 1e-3, ["momentum=0.9"])[2], torch.optim.SGD)
    assert isinstance(build_optimizer("torch.optim.RMSprop", params, 1e-3)[2], torch.optim.RMSprop)
    with pytest.raises(OptimizerArgsError, match="did you mean 'AdamW'"):
        build_optimizer("adamww", params, 1e-3)
    with pytest.raises(OptimizerArgsError, match="has no setting 'momentun'.*did you mean 'momentum'"):
        build_optimizer("SGD", params, 1e-3, ["momentun=0.9"])
    with pytest.raises(OptimizerArgsError, match="cannot import module"):
        build_optimizer("no_such_module_xyz.Opt", params, 1e-3)


def test_prodigy_when_installed():
    pytest.importorskip("prodigyopt")
    _, _, opt = build_optimizer("Prodigy", [torch.nn.Parameter(torch.ones(3))], 1.0, ["d_coef=2"])
    assert type(opt).__name__ == "Prodigy"


# ---------------------------------------------------------------- flattened / sharded parameters


def _stepped(opt):
    for group in opt.param_groups:
        for p in group["params"]:
            p.grad = torch.ones_like(p)
    opt.step()


def test_normal_steps_pass_the_shard_guard():
    _, _, opt = build_optimizer("automagic_sinkgd", _kohya_groups(), 1e-5)
    for _ in range(2):
        _stepped(opt)


def test_deepspeed_style_flat_partition_stops_the_first_step():
    # ZeRO 1/2 replace each group's params with one flat 1-D fp32 partition
    groups = _kohya_groups()
    _, _, opt = build_optimizer("automagic_sinkgd", groups, 1e-5)
    for group in opt.param_groups:
        flat = torch.cat([p.detach().reshape(-1) for p in group["params"]])
        group["params"] = [torch.nn.Parameter(flat)]
    with pytest.raises(ShardedParamsError, match="flattened/sharded"):
        _stepped(opt)


def test_fsdp_style_views_stop_the_first_step():
    # FSDP (use_orig_params) swaps each weight's data for a 1-D view of its shard
    _, _, opt = build_optimizer("automagic_sinkgd", _kohya_groups(), 1e-5)
    weight = opt.param_groups[1]["params"][0]
    weight.data = weight.data.reshape(-1)[:5]
    with pytest.raises(ShardedParamsError, match="2-D weight of group 1 became 1-D"):
        _stepped(opt)


def test_marked_flat_parameters_are_detected():
    _, _, opt = build_optimizer("automagic_sinkgd", _kohya_groups(), 1e-5)
    opt.param_groups[0]["params"][0].ds_id = 3  # ZeRO-3 partitioned parameter
    with pytest.raises(ShardedParamsError, match="group 0"):
        _stepped(opt)


# ---------------------------------------------------------------- resume with other settings


def _saved_state(optimizer_type, args):
    p = torch.nn.Parameter(torch.randn(4, 4))
    _, _, opt = build_optimizer(optimizer_type, [{"params": [p], "lr": 1e-4}], 1e-4, args)
    p.grad = torch.randn(4, 4)
    opt.step()
    return p, opt.state_dict()


@pytest.mark.parametrize("optimizer_type, saved_args, new_args, warned, in_effect", [
    ("automagic_sinkgd", ["warmup_steps=100", "min_lr=1e-6"], ["warmup_steps=10", "orthograd=True", "min_lr=1e-5"],
     ["min_lr=1e-06 (requested 1e-05)", "warmup_steps=100 (requested 10)", "orthograd=False (requested True)"],
     "warmup_steps=100,orthograd=False,min_lr=1e-06"),
    # a setting the resumed run leaves at its default is still the saved one
    ("automagic_sinkgd", ["warmup_steps=100"], [], ["warmup_steps=100 (requested 500)"], "warmup_steps=100"),
    ("AdamW", [], ["weight_decay=0.1"], ["weight_decay=0.01 (requested 0.1)"], "weight_decay=0.01"),
])
def test_resume_names_each_setting_the_state_overrides_and_the_args_text_follows(
        optimizer_type, saved_args, new_args, warned, in_effect):
    p, state = _saved_state(optimizer_type, saved_args)
    messages = []
    _, text, opt = build_optimizer(optimizer_type, [{"params": [p], "lr": 1e-4}], 1e-4, new_args,
                                   report=messages.append)
    assert str(text) == format_optimizer_args(parse_optimizer_args(new_args))  # before the resume: what was asked
    opt.load_state_dict(state)
    assert len(messages) == 1 and all(item in messages[0] for item in warned), messages
    assert "lr=0.0001 (requested" not in messages[0]  # the scheduler-driven lr is not a setting
    assert f"name({text})" == f"name({in_effect})" and len(text) == len(in_effect) and bool(text)


def test_resume_with_the_same_settings_reports_nothing():
    p, state = _saved_state("automagic_sinkgd", ["warmup_steps=100"])
    messages = []
    _, text, opt = build_optimizer("automagic_sinkgd", [{"params": [p], "lr": 1e-4}], 1e-4, ["warmup_steps=100"],
                                   report=messages.append)
    opt.load_state_dict(state)
    assert messages == [] and f"{text}" == "warmup_steps=100"


def test_resume_names_no_setting_the_optimizer_keeps_from_its_configuration():
    """state_precision, fused and foreach follow the resumed run's arguments (the state is converted),
    so a resume that changes them warns about nothing and the args text keeps what was asked."""
    p, state = _saved_state("automagic_sinkgd", ["state_precision='bf16'", "warmup_steps=100"])
    messages = []
    new_args = ["state_precision='fp32'", "fused=True", "foreach=False", "warmup_steps=100"]
    _, text, opt = build_optimizer("automagic_sinkgd", [{"params": [p], "lr": 1e-4}], 1e-4, new_args,
                                   report=messages.append)
    opt.load_state_dict(state)
    group = opt.param_groups[0]
    assert (group["state_precision"], group["fused"], group["foreach"]) == ("fp32", True, False)
    assert opt.state[p]["exp_avg"].dtype == torch.float32
    assert messages == []
    assert f"{text}" == format_optimizer_args(parse_optimizer_args(new_args))



def test_a_group_lr_outside_the_mask_is_one_clear_error_naming_the_group():
    """Before: the optimizer's own message, which puts a 1e-6 .. 1e-4 recommendation next to the allowed range."""
    layer = torch.nn.Linear(4, 4)
    groups = [{"params": [layer.weight], "lr": 1e-4}, {"params": [layer.bias], "lr": 1.0}]
    with pytest.raises(OptimizerArgsError, match=r"^lr of param group 1=1 is out of range for Automagic_Sinkgd: "
                                                 r"allowed min_lr <= lr <= max_lr, i\.e\. \[1e-06, 0\.001\]") as error:
        build_optimizer("automagic_sinkgd", groups, 1e-4, ["max_lr=1e-3"])
    assert "1e-6 .. 1e-4" not in str(error.value)
    with pytest.raises(OptimizerArgsError, match=r"^learning_rate=0\.5 is out of range"):
        build_optimizer("automagic_sinkgd", [layer.weight], 0.5)
