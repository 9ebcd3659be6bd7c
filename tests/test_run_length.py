"""The run's length reaches Automagic_Sinkgd as total_steps (what decay_horizon="run" needs)
from kohya's max_train_steps and from the built-in trainer, unless the user set it."""

from argparse import Namespace

import pytest
import torch

from library import kohya_hook
from library.automagic_sinkgd import Automagic_Sinkgd, warmup_length
from library.kohya_hook import wrap_get_optimizer, wrap_get_scheduler_fix
from library.optimizer_factory import with_run_length

torch.set_num_threads(1)


def test_with_run_length_fills_only_what_the_user_left_out():
    assert with_run_length("automagic_sinkgd", {"warmup_steps": 9}, 1600) == {"warmup_steps": 9, "total_steps": 1600}
    assert with_run_length("Automagic_Sinkgd", {"total_steps": 50}, 1600) == {"total_steps": 50, "warmup_steps": 0.25}
    assert with_run_length("automagic_sinkgd", {}, 1600) == {"total_steps": 1600, "warmup_steps": 0.25}
    assert with_run_length("AdamW", {"weight_decay": 0.1}, 1600) == {"weight_decay": 0.1}
    assert with_run_length("automagic_sinkgd", {}, None) == {}


def _args(network_trainer: bool = True, **overrides):
    """kohya's parsed arguments; only train_network's parser (the LoRA trainers) has --initial_step."""
    values = dict(optimizer_type="automagic_sinkgd", optimizer_args=None, learning_rate=1e-4, use_8bit_adam=False,
                  use_lion_optimizer=False, fused_backward_pass=False, gradient_accumulation_steps=1,
                  deepspeed=False, max_train_steps=1600)
    if network_trainer:
        values["initial_step"] = None
    values.update(overrides)
    return Namespace(**values)


def _groups():
    return [{"params": list(torch.nn.Linear(6, 4).parameters()), "lr": 1e-4}]


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    monkeypatch.setattr(kohya_hook, "_built_optimizers", [])


def _kohya_scheduler(args, optimizer, num_processes):
    return ("scheduler", args.max_train_steps)


def test_kohya_gets_the_final_max_train_steps():
    """kohya builds the optimizer with the command line's max_train_steps (1600 by default) and turns
    --max_train_epochs into steps only afterwards, before it builds the scheduler."""
    _, args_text, opt = wrap_get_optimizer(lambda a, p: None)(_args(optimizer_args=["decay_horizon='run'"]), _groups())
    assert type(opt) is Automagic_Sinkgd and opt.param_groups[0]["total_steps"] == 1600
    assert args_text == "decay_horizon=run"  # kohya's ss_optimizer metadata: the user's own arguments
    final = _args(max_train_steps=730)
    assert wrap_get_scheduler_fix(_kohya_scheduler)(final, opt, 1) == ("scheduler", 730)
    assert [g["total_steps"] for g in opt.param_groups] == [730]


def test_kohya_keeps_the_users_total_steps():
    _, _, opt = wrap_get_optimizer(lambda a, p: None)(_args(optimizer_args=["total_steps=500"]), _groups())
    wrap_get_scheduler_fix(_kohya_scheduler)(_args(max_train_steps=730), opt, 1)
    assert opt.param_groups[0]["total_steps"] == 500


def test_other_optimizers_are_left_alone():
    opt = torch.optim.AdamW(_groups(), lr=1e-3)
    wrap_get_scheduler_fix(_kohya_scheduler)(_args(), opt, 1)
    assert "total_steps" not in opt.param_groups[0]
    once = wrap_get_scheduler_fix(_kohya_scheduler)
    assert wrap_get_scheduler_fix(once) is once  # install() twice wraps once


def test_builtin_trainer_hands_its_run_length(tmp_path, monkeypatch):
    from builtin_fixtures import base_args, build_dataset, build_tiny_pipeline
    from library.builtin.trainer import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, data = build_tiny_pipeline(tmp_path / "model"), build_dataset(tmp_path / "data")
    automagic = ["--optimizer_type", "automagic_sinkgd", "--save_state", "--optimizer_args", "warmup_steps=2"]
    # 8 examples / batch 2 = 4 steps per epoch; --max_train_epochs 2 wins over --max_train_steps 99
    assert main(base_args(model, data, tmp_path / "a", 99) + automagic + ["--max_train_epochs", "2"]) == 0
    saved = torch.load(tmp_path / "a" / "tiny-state" / "optimizer.bin", weights_only=True)
    assert {g["total_steps"] for g in saved["param_groups"]} == {8}
    assert main(base_args(model, data, tmp_path / "b", 3) + automagic + ["total_steps=40"]) == 0
    saved = torch.load(tmp_path / "b" / "tiny-state" / "optimizer.bin", weights_only=True)
    assert {g["total_steps"] for g in saved["param_groups"]} == {40}


def test_a_user_set_total_steps_is_a_saved_setting():
    """The trainer's run length follows a resume; a total_steps the user set is a saved setting
    like any other."""
    from library.optimizer_factory import build_optimizer

    params = [torch.nn.Parameter(torch.randn(4, 3))]
    _, _, first = build_optimizer("automagic_sinkgd", params, 1e-4, ["decay_horizon='run'"], run_length=100)
    params[0].grad = torch.randn(4, 3)
    first.step()
    saved = first.state_dict()
    _, _, longer = build_optimizer("automagic_sinkgd", params, 1e-4, ["decay_horizon='run'"], run_length=300)
    longer.load_state_dict(saved)
    assert longer.param_groups[0]["total_steps"] == 300
    _, _, pinned = build_optimizer("automagic_sinkgd", params, 1e-4, ["decay_horizon='run'", "total_steps=100"],
                                   run_length=300)
    pinned.load_state_dict(saved)
    assert pinned.param_groups[0]["total_steps"] == 100


# The lora preset's schedule: a quarter of the run in warm-up, then a decay to 0 at the run's end.
LORA_SCHEDULE = ["warmup_steps=0.25", "decay_horizon='run'", "decay_floor=0.0", "relative_bump=0.2", "max_lr=1e-3"]


def _kohya_built(steps: int, params: list, network_trainer: bool = True, schedule=LORA_SCHEDULE) -> Automagic_Sinkgd:
    """The optimizer as kohya builds it through the hook: get_optimizer with the command line's
    length, then get_scheduler_fix with the final one."""
    _, _, opt = wrap_get_optimizer(lambda a, p: None)(
        _args(network_trainer, optimizer_args=schedule, max_train_steps=steps), [{"params": params, "lr": 1e-4}])
    wrap_get_scheduler_fix(_kohya_scheduler)(_args(network_trainer, max_train_steps=steps), opt, 1)
    return opt


def _train(opt, params, steps: int, grads: torch.Generator) -> None:
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=grads)
        opt.step()


@pytest.mark.filterwarnings("ignore:Automagic_Sinkgd. total_steps changed")
def test_extending_a_run_on_resume_follows_the_new_length():
    """Train N = 40 steps (warm-up 10, decay to 0 at step 40), resume with 3N: the run keeps
    training, its decay now ends at 3N, and the warm-up that ended stays ended."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(5))]
    grads = torch.Generator().manual_seed(1)
    first = _kohya_built(40, params)
    _train(first, params, 40, grads)
    saved, at_40 = first.state_dict(), [p.detach().clone() for p in params]
    # this run's decay is spent: 0 where the mask ended warm-up at its peak, else what the document's
    # slower slope (avg_lr / avg_lr_max per step) leaves
    ratio = float(first.state[params[0]]["avg_lr"] / first.state[params[0]]["avg_lr_max"])
    assert float(first.state[params[0]]["lr_decay"]) == pytest.approx(1 - ratio, abs=1e-5)

    longer = _kohya_built(120, params)
    longer.load_state_dict(saved)
    _train(longer, params, 20, grads)  # to step 60 = 1.5 N
    state = longer.state[params[0]]
    assert state["step"] == 60 and state["warmup_ended"] == 10 and "polarity" not in state
    rate = float(state["avg_lr"] / state["avg_lr_max"]) / (120 - 10 + 1)
    # after step t the decay stands at 1 - (t - W + 1) x rate, on the new plan
    assert float(state["lr_decay"]) == pytest.approx(1 - (60 - 10 + 1) * rate, rel=1e-5)
    assert float(longer.effective_lrs()[0]) > 0
    assert all(not torch.equal(p, q) for p, q in zip(params, at_40))  # the extension trained


@pytest.mark.filterwarnings("ignore:Automagic_Sinkgd. total_steps changed")
def test_a_longer_run_that_moves_the_warmup_end_past_the_saved_step_does_not_restart_it():
    """8 steps (a share-based warm-up of 2), resumed at 40 steps (a warm-up of 10 > 8): the sign
    history was freed at step 2, so the warm-up must not restart (it crashed in sign_flips_)."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(6, 4))]
    grads = torch.Generator().manual_seed(1)
    first = _kohya_built(8, params)
    _train(first, params, 8, grads)
    longer = _kohya_built(40, params)
    longer.load_state_dict(first.state_dict())
    before = params[0].detach().clone()
    _train(longer, params, 4, grads)
    assert longer.state[params[0]]["warmup_ended"] == 2 and not torch.equal(before, params[0])


# The full preset's schedule: the same decay to 0 at the run's end, with its bf16 state.
FULL_SCHEDULE = ["warmup_steps=0.25", "decay_horizon='run'", "decay_floor=0.0", "lr_bump=2e-6", "max_lr=5e-4",
                 "full_finetune=True", "state_precision='bf16'"]


@pytest.mark.filterwarnings("ignore:Automagic_Sinkgd. total_steps changed")
def test_a_fine_tune_script_resumed_for_more_steps_trains_them():
    """sdxl_train, flux_train, sd3_train, fine_tune and train_db count a resumed run's steps from 0,
    so their --max_train_steps is the steps still to go: 8 steps, then --resume with 8 more. Taken
    as the run's whole length, the decay had ended at step 8 and the 8 steps trained nothing."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(5))]
    grads = torch.Generator().manual_seed(1)
    first = _kohya_built(8, params, network_trainer=False, schedule=FULL_SCHEDULE)
    _train(first, params, 8, grads)
    more = _kohya_built(8, params, network_trainer=False, schedule=FULL_SCHEDULE)
    more.load_state_dict(first.state_dict())
    assert [g["total_steps"] for g in more.param_groups] == [16]
    for step in range(9, 16):  # every step but the last, which the decay reaches 0 at, moves the weights
        before = [p.detach().clone() for p in params]
        _train(more, params, 1, grads)
        assert float(more.effective_lrs()[0]) > 0, step
        assert not torch.equal(before[0], params[0]), step
    # a LoRA trainer (train_network's --initial_step) counts on from the saved step: 16 is the whole run
    lora = _kohya_built(16, params)
    lora.load_state_dict(more.state_dict())
    assert [g["total_steps"] for g in lora.param_groups] == [16]


def test_an_unchanged_length_resumes_bit_for_bit():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(6, 4))]
    start = params[0].detach().clone()
    straight = _kohya_built(40, params)
    _train(straight, params, 40, torch.Generator().manual_seed(1))
    end = params[0].detach().clone()
    with torch.no_grad():
        params[0].copy_(start)
    grads = torch.Generator().manual_seed(1)
    first = _kohya_built(40, params)
    _train(first, params, 25, grads)
    second = _kohya_built(40, params)
    second.load_state_dict(first.state_dict())
    _train(second, params, 15, grads)
    assert torch.equal(params[0], end)


def test_builtin_trainer_extends_a_run(tmp_path, monkeypatch):
    """The built-in trainer: 8 steps with --save_state, then --resume with --max_train_steps 24
    (the warm-up share's end moves past the saved step): no crash, and the LoRA keeps training."""
    from safetensors.torch import load_file

    from builtin_fixtures import base_args, build_dataset, build_tiny_pipeline
    from library.builtin.trainer import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, data = build_tiny_pipeline(tmp_path / "model"), build_dataset(tmp_path / "data")
    automagic = ["--optimizer_type", "automagic_sinkgd", "--learning_rate", "1e-4", "--save_state",
                 "--optimizer_args", *LORA_SCHEDULE]
    assert main(base_args(model, data, tmp_path / "a", 8) + automagic) == 0
    assert main(base_args(model, data, tmp_path / "b", 24) + automagic
                + ["--resume", str(tmp_path / "a" / "tiny-state")]) == 0
    a, b = load_file(str(tmp_path / "a" / "tiny.safetensors")), load_file(str(tmp_path / "b" / "tiny.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a if "lora_up" in k)
    saved = torch.load(tmp_path / "b" / "tiny-state" / "optimizer.bin", weights_only=True)
    assert {g["total_steps"] for g in saved["param_groups"]} == {24}


def test_kohya_run_without_a_warmup_gets_a_quarter_of_the_final_length():
    """No warmup_steps from the user or a preset: the phase split follows kohya's final
    max_train_steps (a 300-step run leaves warm-up; the class default 500 never would)."""
    _, args_text, opt = wrap_get_optimizer(lambda a, p: None)(_args(optimizer_args=None), _groups())
    assert args_text == ""  # ss_optimizer metadata: only the user's own arguments
    wrap_get_scheduler_fix(_kohya_scheduler)(_args(max_train_steps=300), opt, 1)
    group = opt.param_groups[0]
    assert group["warmup_steps"] == 0.25 and warmup_length(group["warmup_steps"], group["total_steps"]) == 75
    _, _, pinned = wrap_get_optimizer(lambda a, p: None)(_args(optimizer_args=["warmup_steps=500"]), _groups())
    assert pinned.param_groups[0]["warmup_steps"] == 500


def _trajectory(steps: int, step_param: bool = False, **kwargs) -> list:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(6, 4)),
              torch.nn.Parameter(torch.randn(5))]
    opt = Automagic_Sinkgd(params, lr=1e-3, orthograd=True, stats_update_freq=1, **kwargs)
    grads = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=grads)
            if step_param:
                opt.step_param(p, opt.param_groups[0])
        if not step_param:
            opt.step()
    return [p.detach().clone() for p in params] + [opt.state[params[0]]["lr_decay"].clone()]


@pytest.mark.parametrize("options", [dict(), dict(foreach=False), dict(state_precision="bf16"),
                                     dict(step_param=True), dict(decay_horizon="run", decay_floor=0.0)])
def test_a_warmup_share_is_that_many_steps_in_every_phase(options):
    """warmup_steps=0.25 of total_steps=16 steps exactly as warmup_steps=4: the phases, the
    decay's slope, the state each phase frees, on the stacked, one-tensor, compact-state and
    fused-backward paths."""
    share = _trajectory(16, warmup_steps=0.25, total_steps=16, **options)
    steps = _trajectory(16, warmup_steps=4, total_steps=16, **options)
    assert all(torch.equal(a, b) for a, b in zip(share, steps))
    other = _trajectory(16, warmup_steps=0.5, total_steps=16, **options)  # the share is read, not ignored
    assert not torch.equal(share[0], other[0])


def test_warmup_length():
    assert warmup_length(500, None) == 500 and warmup_length(0.25, 730) == 182
    assert warmup_length(0.001, 100) == 1  # never 0: the first step is a warm-up step


@pytest.mark.parametrize("value, total, message", [
    (0.25, None, "together with total_steps"), (1.5, 100, "share of total_steps"),
    (0.0, 100, "share of total_steps"), (True, 100, "share of total_steps"), (0, 100, "share of total_steps")])
def test_a_bad_warmup_is_a_clear_error(value, total, message):
    with pytest.raises(ValueError, match="warmup_steps") as error:
        Automagic_Sinkgd(_groups()[0]["params"], lr=1e-4, warmup_steps=value, total_steps=total)
    assert message in str(error.value)


def test_max_warmup_steps_caps_the_warmup_and_is_validated():
    """A share of a short run, a fixed length on long ones; a group saved before the option existed
    has none (the document's warm-up)."""
    assert warmup_length(0.8, 500, 800) == 400 and warmup_length(0.8, 2000, 800) == 800
    assert warmup_length(500, None, 300) == 300 and warmup_length(0.8, 500, None) == 400
    params = [torch.nn.Parameter(torch.zeros(3, 4))]
    for bad in (0, -5, 2.5, True, "800"):
        with pytest.raises(ValueError, match="max_warmup_steps"):
            Automagic_Sinkgd(params, warmup_steps=0.8, total_steps=500, max_warmup_steps=bad)
    optimizer = Automagic_Sinkgd(params, lr=1e-4, warmup_steps=0.8, total_steps=20, max_warmup_steps=6)
    for step in range(8):
        params[0].grad = torch.full((3, 4), 0.1 if step % 2 else -0.1)
        optimizer.step()
        assert ("lr_decay" in optimizer.state[params[0]]) == (step + 1 >= 6), step  # warm-up ends at step 6, not 16
    saved = optimizer.state_dict()
    del saved["param_groups"][0]["max_warmup_steps"]  # as an older version wrote it
    older = Automagic_Sinkgd(params, lr=1e-4, warmup_steps=0.8, total_steps=20, max_warmup_steps=6)
    older.load_state_dict(saved)
    assert older.param_groups[0]["max_warmup_steps"] is None
