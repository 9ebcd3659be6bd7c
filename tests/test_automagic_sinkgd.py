"""Tests of the optimizer core: each technique alone, the composed step against an independent
transcription of the specification, phases, validation, resume, syncs, memory, precision."""

import io
import math

import pytest
import torch

from library import automagic_sinkgd as core
from library.automagic_sinkgd import (
    Automagic_Sinkgd,
    allora_row_scaling,
    automagic_mask_update_,
    grams_direction,
    gradient_scaled_decay,
    orthograd,
    post_warmup_decay,
    prodigy_bumps,
    prodigy_signal,
    sign_flips_,
    sinkgd_normalize,
    stochastic_round_,
    vradam_brake,
)
from host_sync import copy_grads, no_host_sync, on_device
from spec_reference import ReferenceAutomagic, sinkgd_alternating

torch.set_num_threads(1)


# ------------------------------------------------------------------ the techniques, alone


def test_sinkgd_reaches_row_and_column_norms():
    update = torch.randn(3, 24, 10, dtype=torch.float64) * torch.rand(3, 24, 1, dtype=torch.float64)
    out = sinkgd_normalize(update, 50)
    torch.testing.assert_close(out.norm(dim=1), torch.full((3, 10), math.sqrt(24), dtype=torch.float64))
    torch.testing.assert_close(out.norm(dim=2), torch.full((3, 24), math.sqrt(10), dtype=torch.float64))


@pytest.mark.parametrize("iters", [1, 4, 5])
def test_sinkgd_equals_alternating_normalisation(iters):
    update = torch.randn(2, 16, 40, dtype=torch.float64)
    update[0, 3] = 0.0  # an all-zero row must stay zero, not turn into NaN
    fast = sinkgd_normalize(update, iters)
    for b in range(2):
        torch.testing.assert_close(fast[b], sinkgd_alternating(update[b], iters))
    assert torch.isfinite(fast).all() and (fast[0, 3] == 0).all()


def test_sinkgd_zero_iterations_is_identity():
    update = torch.randn(1, 5, 7)
    assert torch.equal(sinkgd_normalize(update, 0), update)


def test_orthograd_is_orthogonal_to_weights_and_keeps_norm():
    update, weight = torch.randn(4, 8, 6, dtype=torch.float64), torch.randn(4, 8, 6, dtype=torch.float64)
    out = orthograd(update, weight)
    dots = (out * weight).sum(dim=(1, 2))
    assert dots.abs().max() < 1e-10
    torch.testing.assert_close(out.norm(dim=(1, 2)), update.norm(dim=(1, 2)))


def test_grams_sign_rules():
    grad = torch.tensor([[[1.0, -2.0, 0.5, 0.0]]])
    exp_avg = torch.tensor([[[-3.0, 1.0, -0.1, 2.0]]])
    # matrices: |m| * sign(g + m)
    expected = exp_avg.abs() * torch.sign(grad + exp_avg)
    assert torch.equal(grams_direction(grad, exp_avg, is_matrix=True), expected)
    # vectors: |m| * sign(g); a zero gradient gives a zero step
    vec_g, vec_m = grad.view(1, 4), exp_avg.view(1, 4)
    assert torch.equal(grams_direction(vec_g, vec_m, is_matrix=False), vec_m.abs() * torch.sign(vec_g))
    assert grams_direction(vec_g, vec_m, is_matrix=False)[0, 3] == 0


def test_mask_bumps_up_on_agreement_down_on_flip_and_clamps():
    mask = torch.tensor([[1e-4, 1e-4, 9.95e-4, 2e-6]])
    flips = torch.tensor([[0.0, 1.0, 0.0, 1.0]])
    up, down = torch.tensor([1e-5]), torch.tensor([3e-5])
    automagic_mask_update_(mask, flips, up, down, 1e-6, 1e-3)
    torch.testing.assert_close(mask, torch.tensor([[1.1e-4, 0.7e-4, 1e-3, 1e-6]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sign_flips_compare_g_greater_than_zero_with_last_polarity(dtype):
    # zeros count as "not positive" (a zero-initialised lora_up gives lora_down exact zero grads)
    grad = torch.tensor([[[1.0, -2.0, 0.0, -0.0, 3e-45, -1.0]], [[1.0, -2.0, 0.0, -0.0, 5.0, -1.0]]], dtype=dtype)
    polarity = torch.tensor([[[True, True, True, False, False, False]]] * 2)
    keep = torch.tensor([True, False])
    flips = sign_flips_(grad, polarity, keep)
    expected_positive = grad[0] > 0
    assert flips.dtype == dtype
    assert torch.equal(flips[0], (expected_positive != torch.tensor([[True, True, True, False, False, False]])).to(dtype))
    assert torch.equal(polarity[0], expected_positive)
    assert torch.equal(flips[1], torch.zeros_like(flips[1]))  # a skipped tensor: no flips,
    assert torch.equal(polarity[1], torch.tensor([[True, True, True, False, False, False]]))  # signs kept


def test_prodigy_bumps_follow_the_signal():
    like = torch.zeros(1)
    up, down = prodigy_bumps(1e-5, 3.0, torch.tensor([2.0, -1.0, 0.0]), 3, like)
    torch.testing.assert_close(up, torch.tensor([3e-5, 1e-5, 1e-5]))
    torch.testing.assert_close(down, torch.tensor([1e-5, 3e-5, 1e-5]))
    up, down = prodigy_bumps(1e-5, 1.0, torch.tensor([2.0]), 1, like)  # d_coef 1: no boost
    assert up.item() == down.item() == pytest.approx(1e-5)


def test_prodigy_signal_is_minus_grad_dot_displacement():
    g, x, x0 = torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    expected = -(g * (x - x0)).sum(dim=(1, 2))
    torch.testing.assert_close(prodigy_signal(g, x, x0), expected)


def test_post_warmup_decay_is_capped_by_scheduler_and_floored():
    lr_decay = torch.tensor([0.9, 0.5, 0.05])
    torch.testing.assert_close(post_warmup_decay(lr_decay, 1.0), torch.tensor([0.9, 0.5, 0.1]))
    # an outside scheduler at 30% of the peak lowers the factor, never raises it
    torch.testing.assert_close(post_warmup_decay(lr_decay, 0.3), torch.tensor([0.3, 0.3, 0.1]))


def test_vradam_brake():
    m = torch.zeros(3, 4)
    m[1] = 0.1  # sum m^2 = 0.04 -> 1 / (1 + 0.12)
    m[2] = 10.0  # saturates at 1 / 11
    torch.testing.assert_close(vradam_brake(m), torch.tensor([1.0, 1 / 1.12, 1 / 11]))


def test_allora_row_scaling():
    w = torch.tensor([[[0.0, 0.0], [3.0, 4.0]]])  # row norms 0 and 5
    eta = 2.0
    torch.testing.assert_close(allora_row_scaling(w, eta), torch.tensor([[eta, 1 / math.sqrt(5 + 0.25)]]))


def test_gradient_scaled_decay():
    theta = gradient_scaled_decay(torch.tensor([1.0, 3.0, -1.0]), torch.tensor(1.0), torch.tensor(1.0))
    torch.testing.assert_close(theta, 2 * torch.sigmoid(4 * torch.tensor([0.0, 2.0, -2.0])))


def test_stochastic_rounding_keeps_tiny_bf16_updates_on_average():
    weight = torch.ones(2048, dtype=torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    for _ in range(1000):  # 1e-4 is 1/78 of a bf16 ulp at 1.0: nearest rounding would never move
        stochastic_round_(weight, weight.float() + 1e-4, generator)
    assert weight.float().mean().item() == pytest.approx(1.1, rel=0.03)
    nearest = torch.ones(2048, dtype=torch.bfloat16)
    for _ in range(10):
        nearest = (nearest.float() + 1e-4).to(torch.bfloat16)
    assert torch.equal(nearest, torch.ones_like(nearest))


def test_stochastic_rounding_fp16():
    weight = torch.ones(4096, dtype=torch.float16)
    generator = torch.Generator().manual_seed(1)
    for _ in range(500):  # fp16 ulp at 1.0 is ~9.8e-4
        stochastic_round_(weight, weight.float() - 1e-4, generator)
    assert weight.float().mean().item() == pytest.approx(0.95, rel=0.01)


# ------------------------------------------------------------------ the composed step vs the spec


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.ModuleDict(dict(
        lora_down=torch.nn.Linear(12, 4, bias=False),
        lora_up=torch.nn.Linear(4, 12, bias=True),
        conv=torch.nn.Conv2d(3, 5, 3),
        norm=torch.nn.LayerNorm(12),
    ))


def _synthetic_grads(params, step):
    """Gradients independent of the weights, so sign decisions cannot drift between two runs."""
    generator = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=generator) * (1e-3 * (1 + step % 3))).to(p.dtype)


CONFIGS = [
    dict(lr=1e-4, min_lr=1e-6, max_lr=1e-3, lr_bump=2e-5, warmup_steps=8, orthograd=True, stats_update_freq=2),
    dict(lr=1e-4, min_lr=1e-6, max_lr=1e-3, lr_bump=2e-5, warmup_steps=9, full_finetune=True, orthograd=True,
         d_coef=3, weight_decay=1e-2, stats_update_freq=3),
    dict(lr=5e-5, warmup_steps=4, d_coef=1, weight_decay=0.0, beta1=0.5),
]


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("foreach", [True, False])
def test_step_matches_the_specification(config, foreach):
    model, reference_model = _model(), _model()
    params, ref_params = list(model.parameters()), list(reference_model.parameters())
    optimizer = Automagic_Sinkgd(params, foreach=foreach, **config)
    reference = ReferenceAutomagic(ref_params, **config)
    for step in range(2 * config["warmup_steps"] + 3):  # early warm-up, late warm-up, after
        _synthetic_grads(params, step)
        _synthetic_grads(ref_params, step)
        optimizer.step()
        reference.step()
        for p, q in zip(params, ref_params):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
        for p, q in zip(params, ref_params):
            torch.testing.assert_close(optimizer.state[p]["lr_mask"].double(), reference.state[q]["mask"],
                                       rtol=1e-5, atol=1e-9)


def test_batched_and_per_tensor_paths_agree():
    # (16, 32, 1, 1) convs share a bucket with the (16, 32) linears: LoRA's proj_in/out do that
    shapes = [(16, 32)] * 3 + [(16, 32, 1, 1)] * 2 + [(16, 32)] * 2 + [(32, 16)] * 4 + [(8, 3, 3, 3)] * 3 + [(32,)] * 3
    def run(foreach):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s) * 0.1) for s in shapes]
        optimizer = Automagic_Sinkgd(params, lr=1e-4, min_lr=1e-6, max_lr=1e-3, lr_bump=1e-5, warmup_steps=6,
                                     orthograd=True, foreach=foreach)
        for step in range(14):
            _synthetic_grads(params, step)
            optimizer.step()
        return params, optimizer
    batched, opt_b = run(True)
    single, opt_s = run(False)
    for p, q in zip(batched, single):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-8)
        torch.testing.assert_close(opt_b.state[p]["exp_avg"], opt_s.state[q]["exp_avg"])


# ------------------------------------------------------------------ phases and settings


def test_first_step_moves_nothing_and_phases_free_their_state():
    model = _model()
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    optimizer = Automagic_Sinkgd(params, lr=1e-4, warmup_steps=6)
    _synthetic_grads(params, 0)
    optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    state = optimizer.state[params[0]]
    assert {"initial_weight", "polarity"} <= set(state)
    for step in range(1, 3):  # t = 3: t >= warmup / 2, x0 no longer needed
        _synthetic_grads(params, step)
        optimizer.step()
    assert "initial_weight" not in state and "polarity" in state
    for step in range(3, 6):  # t = 6 = warmup: mask frozen, polarity no longer needed
        _synthetic_grads(params, step)
        optimizer.step()
    assert "polarity" not in state and "lr_decay" in state
    mask = state["lr_mask"].clone()
    _synthetic_grads(params, 6)
    optimizer.step()
    assert torch.equal(state["lr_mask"], mask)


def test_no_x0_when_prodigy_is_off():
    p = torch.nn.Parameter(torch.randn(4, 4))
    optimizer = Automagic_Sinkgd([p], lr=1e-4, d_coef=1)
    p.grad = torch.randn(4, 4)
    optimizer.step()
    assert "initial_weight" not in optimizer.state[p]


def test_each_group_mask_starts_at_its_own_lr_and_scheduler_base():
    a, b, c = (torch.nn.Parameter(torch.randn(3, 3)) for _ in range(3))
    optimizer = Automagic_Sinkgd([{"params": [a], "lr": 1e-4}, {"params": [b], "lr": 2e-5},
                                  {"params": [c], "lr": 0.0, "initial_lr": 3e-5, "min_lr": 0.0}], lr=1e-5)
    for p in (a, b, c):
        p.grad = torch.randn(3, 3)
    optimizer.step()
    assert optimizer.state[a]["lr_mask"].unique().tolist() == pytest.approx([1e-4])
    assert optimizer.state[b]["lr_mask"].unique().tolist() == pytest.approx([2e-5])
    assert optimizer.state[c]["lr_mask"].unique().tolist() == pytest.approx([3e-5])


def test_orthograd_switch_changes_the_step():
    def run(flip):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(6, 6))
        optimizer = Automagic_Sinkgd([w], lr=1e-4, warmup_steps=2, orthograd=False)
        for step in range(6):
            if step == 4 and flip:
                optimizer.param_groups[0]["orthograd"] = True
            _synthetic_grads([w], step)
            optimizer.step()
        return w.detach()
    assert not torch.allclose(run(False), run(True), rtol=0, atol=1e-9)


def test_stats_update_freq_changed_during_training_is_used():
    params = list(_model().parameters())
    optimizer = Automagic_Sinkgd(params, lr=1e-4, warmup_steps=100, stats_update_freq=1000)
    _synthetic_grads(params, 0)
    optimizer.step()
    first = optimizer.param_groups[0]["grad_abs_mean"].clone()
    for step in range(1, 4):
        _synthetic_grads(params, step)
        optimizer.step()
    assert torch.equal(optimizer.param_groups[0]["grad_abs_mean"], first)
    optimizer.param_groups[0]["stats_update_freq"] = 1
    _synthetic_grads(params, 4)
    optimizer.step()
    assert not torch.equal(optimizer.param_groups[0]["grad_abs_mean"], first)


def test_scheduler_lowering_lr_after_warmup_lowers_the_step():
    def step_size(scale):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(8, 8))
        optimizer = Automagic_Sinkgd([w], lr=1e-4, warmup_steps=20)
        for step in range(21):
            _synthetic_grads([w], step)
            optimizer.step()
        optimizer.param_groups[0]["lr"] *= scale
        before = w.detach().clone()
        _synthetic_grads([w], 21)
        optimizer.step()
        return (w.detach() - before).norm().item(), optimizer.state[w]["lr_decay"].item()
    full, lr_decay = step_size(1.0)
    assert 0.8 < lr_decay < 0.95  # linear decay from 1 at the end of warm-up
    lowered, _ = step_size(0.3)
    assert lowered == pytest.approx(full * 0.3 / lr_decay, rel=1e-4)  # min(decay, 0.3) vs decay
    raised, _ = step_size(2.0)
    assert raised == pytest.approx(full, rel=1e-6)  # a scheduler can only lower it


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize("kwargs, setting", [
    (dict(lr=0.0), "lr"), (dict(lr=-1e-5), "lr"), (dict(min_lr=1e-3, max_lr=1e-4), "max_lr"),
    (dict(lr=1.0), "lr=1.0"), (dict(lr=1e-7), "lr"), (dict(beta1=1.0), "beta1"), (dict(beta1=-0.1), "beta1"),
    (dict(eta=0), "eta"), (dict(lr_bump=-1e-5), "lr_bump"), (dict(weight_decay=-1.0), "weight_decay"),
    (dict(warmup_steps=0), "warmup_steps"), (dict(stats_update_freq=0), "stats_update_freq"),
    (dict(d_coef=0.5), "d_coef"), (dict(sinkgd_iters=-1), "sinkgd_iters"), (dict(orthograd="yes"), "orthograd"),
])
def test_bad_settings_name_the_setting_and_range(kwargs, setting):
    with pytest.raises(ValueError, match="allowed") as error:
        Automagic_Sinkgd([torch.nn.Parameter(torch.zeros(2))], **kwargs)
    assert setting in str(error.value)


def test_prodigy_habit_gets_a_hint():
    with pytest.raises(ValueError, match="Prodigy"):
        Automagic_Sinkgd([torch.nn.Parameter(torch.zeros(2))], lr=1.0)


def test_group_lr_out_of_range_names_the_group():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="param group 1"):
        Automagic_Sinkgd([{"params": [torch.nn.Parameter(torch.zeros(2))]}, {"params": [p], "lr": 0.5}], lr=1e-5)


def test_a_group_added_later_is_validated_too():
    optimizer = Automagic_Sinkgd([torch.nn.Parameter(torch.zeros(2))], lr=1e-5)
    with pytest.raises(ValueError, match="param group 1"):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 1.0})


def test_sparse_and_complex_gradients_are_refused():
    p = torch.nn.Parameter(torch.zeros(4, 2))
    p.grad = torch.zeros(4, 2).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        Automagic_Sinkgd([p]).step()
    c = torch.nn.Parameter(torch.zeros(2, dtype=torch.complex64))
    c.grad = torch.zeros(2, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match="complex"):
        Automagic_Sinkgd([c]).step()


# ------------------------------------------------------------------ resume


def _train(params, optimizer, steps, start=0):
    for step in range(start, start + steps):
        _synthetic_grads(params, step)
        optimizer.step()


def _step_all(optimizer, params, per_param: bool) -> None:
    """One optimizer step, either as step() or tensor by tensor through step_param (kohya's
    --fused_backward_pass)."""
    if per_param:
        for p in params:
            optimizer.step_param(p, optimizer.param_groups[0])
    else:
        optimizer.step()


def _through_a_file(obj):
    """``obj`` after torch.save and torch.load(weights_only=True): what accelerate's resume does."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _saved_and_resumed(params, config, steps, train):
    """Train ``params`` for ``steps`` steps, save weights and optimizer through a file, and load both
    into fresh parameters and a fresh optimizer, as a resumed run does; returns (params, optimizer)."""
    optimizer = Automagic_Sinkgd(params, **config)
    train(params, optimizer, steps)
    saved = _through_a_file({"optimizer": optimizer.state_dict(), "params": [p.detach() for p in params]})
    resumed = [torch.nn.Parameter(t.clone()) for t in saved["params"]]
    optimizer = Automagic_Sinkgd(resumed, **config)
    optimizer.load_state_dict(saved["optimizer"])
    return resumed, optimizer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("resume_at", [2, 5, 9, 13])  # early warm-up, late warm-up, after, later
def test_resume_is_bit_identical(dtype, resume_at):
    total, config = 16, dict(lr=1e-4, min_lr=1e-6, max_lr=1e-3, lr_bump=1e-5, warmup_steps=8, orthograd=True)
    straight = [p.to(dtype) for p in _model().parameters()]
    straight = [torch.nn.Parameter(p.detach()) for p in straight]
    optimizer = Automagic_Sinkgd(straight, **config)
    _train(straight, optimizer, total)

    resumed, optimizer = _saved_and_resumed(
        [torch.nn.Parameter(p.detach().to(dtype)) for p in _model().parameters()], config, resume_at, _train)
    for p in resumed:
        assert optimizer.state[p]["exp_avg"].dtype == torch.float32
        assert optimizer.state[p]["lr_mask"].dtype == torch.float32
        if "polarity" in optimizer.state[p]:
            assert optimizer.state[p]["polarity"].dtype == torch.bool
    _train(resumed, optimizer, total - resume_at, start=resume_at)
    for p, q in zip(straight, resumed):
        assert torch.equal(p, q)


# ------------------------------------------------------------------ syncs, memory, non-finite


@pytest.mark.parametrize("options", [{}, dict(lr_growth=1.0)], ids=["default", "lr_growth"])
@pytest.mark.parametrize("launch_bound", [False, True], ids=["cpu_choices", "gpu_choices"])
@pytest.mark.parametrize("device", ["cpu", "meta"])  # meta: a copy to the host is a real copy there
@pytest.mark.parametrize("per_param", [False, True])
def test_step_has_no_host_syncs(per_param, device, launch_bound, options, monkeypatch):
    """gpu_choices: the step as a GPU takes it (core._launch_bound), with the vectors of both lengths
    in one padded stack and the finite test made for the whole group."""
    monkeypatch.setattr(core, "_launch_bound", lambda device: launch_bound)
    grads_from = list(_model().parameters())
    params = on_device(grads_from, device)
    optimizer = Automagic_Sinkgd(params, lr=1e-4, warmup_steps=6, orthograd=True, stats_update_freq=2, **options)
    for step in range(10):  # through every phase
        _synthetic_grads(grads_from, step)
        grads_from[0].grad[0, 0] = float("nan") if step == 3 else grads_from[0].grad[0, 0]
        copy_grads(grads_from, params)
        with no_host_sync():
            _step_all(optimizer, params, per_param=per_param)


def test_a_lone_tensor_is_updated_in_place_and_a_stack_keeps_its_state_buffers():
    """Copies cost a full pass over memory each: a tensor alone in its bucket (most tensors of a
    full fine-tune) is stepped through views, and a stack's state is gathered only once."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class CountCopies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.copies = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            # each takes a list of tensors first; stacks of per-tensor scalars (statistics) are free
            if (func.overloadpacket in (torch.ops.aten.stack, torch.ops.aten.cat, torch.ops.aten._foreach_copy_)
                    and args[0][0].ndim > 0):
                self.copies.append(tuple(args[0][0].shape))
            return func(*args, **(kwargs or {}))

    lone = torch.nn.Parameter(torch.randn(64, 48))
    stacked = [torch.nn.Parameter(torch.randn(8, 16)) for _ in range(3)]
    optimizer = Automagic_Sinkgd([lone] + stacked, lr=1e-4, warmup_steps=6, orthograd=True)
    for step in range(10):  # every phase
        _synthetic_grads([lone] + stacked, step)
        with CountCopies() as counter:
            optimizer.step()
        if step >= 2:  # past the first step and the one that builds the stacks' state buffers
            # only the stack of three: its gradients and weights in, its weights out
            assert sorted(counter.copies) == [(8, 16)] * 3, counter.copies


def test_non_finite_gradient_leaves_that_tensor_and_its_state_unchanged():
    params = list(_model().parameters())
    optimizer = Automagic_Sinkgd(params, lr=1e-4, warmup_steps=6, weight_decay=1e-2, stats_update_freq=1)
    for step in range(3):
        _synthetic_grads(params, step)
        optimizer.step()
    bad = params[0]
    before_weight = bad.detach().clone()
    before_state = {k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[bad].items()}
    others_before = [p.detach().clone() for p in params[1:]]
    _synthetic_grads(params, 3)
    bad.grad[1, 2] = float("inf")
    bad.grad[0, 0] = float("nan")
    optimizer.step()
    assert torch.equal(bad, before_weight)
    for key, value in before_state.items():
        if torch.is_tensor(value):
            assert torch.equal(optimizer.state[bad][key], value), key
    assert all(not torch.equal(p, b) for p, b in zip(params[1:], others_before))
    assert all(torch.isfinite(p).all() for p in params)


def test_mask_keeps_every_bump_across_the_range():
    # float16 would lose these: below 6e-5 it is subnormal, near 1e-2 its ulp is ~8e-6
    p = torch.nn.Parameter(torch.zeros(2, 2, dtype=torch.bfloat16))
    optimizer = Automagic_Sinkgd([p], lr=5e-7, min_lr=5e-7, max_lr=1e-2, lr_bump=1e-6, warmup_steps=10**4)
    p.grad = torch.ones(2, 2, dtype=torch.bfloat16)
    optimizer.step()
    mask = optimizer.state[p]["lr_mask"]
    assert mask.dtype == torch.float32
    for target in (5e-7, 1e-2 - 1e-6):
        mask.fill_(target)
        optimizer.step()  # same gradient sign: every element bumps up once
        assert (mask - target).double().sub(1e-6).abs().max().item() < 1e-8


def test_transient_memory_is_a_few_times_the_largest_tensor():
    from benchmarks.speed import transient_peak_bytes
    torch.manual_seed(0)
    # LoRA-like: many small same-shape matrices; stacking them all at once would be ~100x one
    params = [torch.nn.Parameter(torch.randn(640, 400)), torch.nn.Parameter(torch.randn(64, 64)),
              torch.nn.Parameter(torch.randn(1024))] + [torch.nn.Parameter(torch.randn(16, 320)) for _ in range(600)]
    optimizer = Automagic_Sinkgd(params, lr=1e-4, warmup_steps=100)
    for step in range(3):
        _synthetic_grads(params, step)
        optimizer.step()
    _synthetic_grads(params, 3)
    try:
        peak = transient_peak_bytes(optimizer)
    except RuntimeError as error:
        pytest.skip(str(error))
    largest = 640 * 400 * 4
    assert peak > largest  # the timeline saw the step's temporaries
    assert peak <= 6 * largest, f"transient {peak / 2**20:.1f} MiB vs largest tensor {largest / 2**20:.1f} MiB"


# ------------------------------------------------------------------ fused backward, logging, training


def test_step_param_equals_step_without_group_statistics():
    def run(per_param):
        params = list(_model().parameters())
        optimizer = Automagic_Sinkgd(params, lr=1e-4, warmup_steps=6, weight_decay=0.0, orthograd=True, foreach=False)
        for step in range(12):
            _synthetic_grads(params, step)
            _step_all(optimizer, params, per_param=per_param)
        return params
    for p, q in zip(run(True), run(False)):
        assert torch.equal(p, q)


def test_effective_lrs_per_group():
    a, b = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(4))
    optimizer = Automagic_Sinkgd([{"params": [a], "lr": 1e-4}, {"params": [b], "lr": 1e-5}], lr=1e-5,
                                 vradam=False, allora=False)
    lrs = optimizer.effective_lrs()
    assert [x.item() for x in lrs] == pytest.approx([1e-4, 1e-5])
    a.grad, b.grad = torch.randn(4, 4), torch.randn(4)
    optimizer.step()
    assert [x.item() for x in optimizer.effective_lrs()] == pytest.approx([1e-4, 1e-5])
    assert optimizer.state[a]["avg_lr"].item() == pytest.approx(1e-4)


def _train_small_classifier(steps: int = 150, **settings) -> list[float]:
    """A conv + linear classifier trained full-batch on a seeded toy task; the loss of each step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.GELU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 8 * 8, 10))
    x = torch.randn(256, 1, 8, 8)
    y = (x.mean(dim=(1, 2, 3)) * 20).long().clamp(-5, 4) + 5
    optimizer = Automagic_Sinkgd(model.parameters(), lr=1e-3, min_lr=1e-5, max_lr=1e-2, lr_bump=1e-4,
                                 warmup_steps=60, full_finetune=True, orthograd=True, **settings)
    losses = []
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_a_small_model_learns():
    losses = _train_small_classifier()
    assert losses[-1] < 0.5 * losses[0]


def test_an_lr_of_one_names_one_range_only():
    """lr=1.0 (a Prodigy habit): the message gives the allowed range, with no second, contradictory
    "recommended" range beside it."""
    with pytest.raises(ValueError, match=r"allowed: min_lr <= lr <= max_lr, i.e. \[1e-06, 0.01\]") as error:
        Automagic_Sinkgd([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    assert "1e-6 .. 1e-4" not in str(error.value) and "Prodigy" in str(error.value)
