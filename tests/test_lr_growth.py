"""The opt-in per-tensor growth factor, lr_growth: during warm-up each tensor's rate is multiplied
by a factor that grows by exp(lr_growth x a) per step, a = the tensor's mean sign agreement of
gradient and momentum, clamped to [1, lr_growth_max], and frozen after warm-up. Off by default
(the document's step, which the conformance tests check); on, it must scale the update by exactly
its factor, leave a skipped tensor alone, take the same values on every path (stacked, one tensor
at a time, a GPU's padded stacks, a bf16 state) and survive a resume bit for bit. The fused
kernels implement it too: tests/test_fused_kernels.py compares them with these values."""

import math
import re
import warnings

import pytest
import torch

import library.automagic_sinkgd as core
from library.automagic_sinkgd import Automagic_Sinkgd, momentum_agreement_growth_
from test_automagic_sinkgd import _saved_and_resumed

torch.set_num_threads(1)


def _set_grads(params, signs):
    for p, sign in zip(params, signs):
        p.grad = sign * torch.ones_like(p)


def test_the_factor_follows_the_mean_agreement_and_stays_within_its_bounds():
    growth = torch.tensor([1.0, 1.0, 2.0, 90.0])
    grad = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, -1.0, 1.0, 1.0], [-1.0, -1.0, -1.0, -1.0], [1.0, 1.0, 1.0, 1.0]])
    momentum = torch.ones(4, 4)
    keep = torch.ones(4)
    momentum_agreement_growth_(growth, grad, momentum, 0.5, 100.0, keep)
    # a = 1, 0.5, -1, 1: x e^0.5, x e^0.25, x e^-0.5 (2 -> 1.21), x e^0.5 clamped at 100
    expected = torch.tensor([math.exp(0.5), math.exp(0.25), 2 * math.exp(-0.5), 100.0])
    assert torch.allclose(growth, expected, rtol=1e-6)
    momentum_agreement_growth_(growth, -grad, momentum, 0.5, 100.0, keep)
    assert growth[2] == pytest.approx(2.0, rel=1e-6) and growth[0] == 1.0  # never below 1
    skipped = growth.clone()
    momentum_agreement_growth_(growth, grad, momentum, 0.5, 100.0, torch.zeros(4))
    assert torch.equal(growth, skipped)  # keep = 0: a skipped tensor's factor is left as it was


def test_padding_of_a_stack_of_vectors_does_not_count():
    """A GPU's padded (B, L) stack: the mean is over each vector's own length."""
    from library.automagic_sinkgd import _padded_mean_weights

    short, long = torch.ones(2), torch.ones(4)
    grad = torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    weights = _padded_mean_weights([short, long], 4, torch.float32)
    growth = torch.ones(2)
    momentum_agreement_growth_(growth, grad, torch.ones(2, 4), 1.0, 100.0, torch.ones(2), weights)
    assert torch.allclose(growth, torch.full((2,), math.e), rtol=1e-6)


def test_a_tensor_whose_gradient_keeps_its_direction_climbs_and_a_noisy_one_does_not():
    params = [torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(4)),
              torch.nn.Parameter(torch.randn(6, 4))]
    opt = Automagic_Sinkgd(params, lr=1e-4, warmup_steps=10, lr_growth=0.5, lr_growth_max=100.0, weight_decay=0.0,
                           d_coef=1)
    for t in range(14):
        _set_grads(params, [1.0, 1.0, (-1.0) ** t])
        opt.step()
    grown = math.exp(0.5 * 8)  # step 1 initialises the momentum; steps 2-9 are the warm-up's moves
    factors = [float(opt.state[p]["lr_growth"]) for p in params]
    assert factors == pytest.approx([grown, grown, 1.0], rel=1e-5)  # and frozen after warm-up (steps 10-14)
    capped = Automagic_Sinkgd([params[0]], lr=1e-4, warmup_steps=10, lr_growth=0.5, lr_growth_max=3.0)
    for _ in range(6):
        _set_grads(params[:1], [1.0])
        capped.step()
    assert float(capped.state[params[0]]["lr_growth"]) == pytest.approx(3.0)


def test_lr_growth_steps_ends_the_adaptation_early():
    p = torch.nn.Parameter(torch.randn(6, 4))
    opt = Automagic_Sinkgd([p], lr=1e-4, warmup_steps=50, lr_growth=0.5, lr_growth_steps=5)
    for _ in range(12):
        _set_grads([p], [1.0])
        opt.step()
    assert float(opt.state[p]["lr_growth"]) == pytest.approx(math.exp(0.5 * 4), rel=1e-5)  # steps 2-5


def _delta_of_one_step(growth, warmup, steps, precision="fp32"):
    """The weights' move at step ``steps`` under a steady gradient (mask, momentum and brake are
    then the same with and without the factor), and the optimizer. float64 weights, so the move
    is not lost in the weights' rounding."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8, 6, dtype=torch.float64)),
              torch.nn.Parameter(torch.randn(6, dtype=torch.float64))]
    opt = Automagic_Sinkgd(params, lr=1e-4, warmup_steps=warmup, lr_growth=growth, lr_growth_max=1e3,
                           weight_decay=0.0, d_coef=1, state_precision=precision)
    signs = torch.Generator().manual_seed(1)
    pattern = [torch.where(torch.rand(p.shape, generator=signs) < 0.8, 1.0, -1.0).double() for p in params]
    for _ in range(steps - 1):
        for p, s in zip(params, pattern):
            p.grad = s.clone()
        opt.step()
    before = [p.detach().clone() for p in params]
    for p, s in zip(params, pattern):
        p.grad = s.clone()
    opt.step()
    return [p.detach() - b for p, b in zip(params, before)], opt, params


@pytest.mark.parametrize("warmup, steps", [(20, 8), (5, 9)])  # in warm-up; after it (factor frozen)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_factor_scales_the_whole_update_by_exactly_itself(warmup, steps, precision):
    plain, _, _ = _delta_of_one_step(None, warmup, steps, precision)
    grown, opt, params = _delta_of_one_step(1.0, warmup, steps, precision)
    for delta, base, p in zip(grown, plain, params):
        factor = float(opt.state[p]["lr_growth"])
        assert factor > 1.5  # the steady sign pattern agrees with its momentum
        assert torch.allclose(delta, factor * base, rtol=1e-6, atol=0)


def test_a_skipped_tensor_keeps_its_factor():
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(5, 3))]
    opt = Automagic_Sinkgd(params, lr=1e-4, warmup_steps=20, lr_growth=0.5)  # e^1.5 after 4 steps: below the bound
    for _ in range(4):
        _set_grads(params, [1.0, 1.0])
        opt.step()
    kept = opt.state[params[1]]["lr_growth"].clone()
    weights = params[1].detach().clone()
    poisoned = torch.ones(5, 3)
    poisoned[2, 1] = float("nan")  # one NaN: the tensor is skipped, its other elements still agree
    params[0].grad, params[1].grad = torch.ones(5, 3), poisoned
    opt.step()
    assert torch.equal(opt.state[params[1]]["lr_growth"], kept)
    assert torch.equal(params[1].detach(), weights)
    assert float(opt.state[params[0]]["lr_growth"]) > float(kept)


def _run(make, steps, start=0, opt=None, params=None):
    if opt is None:
        params, opt = make()
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) + 0.5  # a drift for the factor to find
        opt.step()
    return params, opt


_GROWTH = dict(lr=1e-4, warmup_steps=6, lr_growth=1.0)


def _params():
    torch.manual_seed(0)
    return [torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(6, 4)),
            torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(7)),
            torch.nn.Parameter(torch.randn(3, 4, 2, 2))]


def _fresh(**kwargs):
    def make():
        params = _params()
        return params, Automagic_Sinkgd(params, **_GROWTH, **kwargs)
    return make


@pytest.mark.parametrize("kwargs", [dict(foreach=False), dict(state_precision="bf16"),
                                    dict(state_precision="bf16", foreach=False)])
def test_every_path_takes_the_same_values(kwargs):
    reference, _ = _run(_fresh(), 10)
    other, _ = _run(_fresh(**kwargs), 10)
    tolerance = 0 if "state_precision" not in kwargs else 1e-3  # a bf16 momentum rounds
    for a, b in zip(reference, other):
        assert torch.allclose(a, b, rtol=0, atol=tolerance)


def test_a_gpus_padded_stacks_take_the_cpus_values(monkeypatch):
    reference, ref_opt = _run(_fresh(), 10)
    monkeypatch.setattr(core, "_launch_bound", lambda device: True)  # the eager step's GPU choices
    padded, opt = _run(_fresh(), 10)
    for p, q in zip(reference, padded):
        assert torch.allclose(ref_opt.state[p]["lr_growth"], opt.state[q]["lr_growth"], rtol=1e-5)
        assert torch.allclose(p, q, rtol=0, atol=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("saved_at", [3, 8])  # in warm-up, after it
def test_resume_continues_bit_for_bit(precision, saved_at):
    straight, _ = _run(_fresh(state_precision=precision), 12)
    params, opt = _saved_and_resumed(_params(), dict(_GROWTH, state_precision=precision), saved_at,
                                     lambda ps, o, steps: _run(None, steps, opt=o, params=ps))
    assert opt.param_groups[0]["lr_growth"] == 1.0
    _run(None, 12 - saved_at, start=saved_at, opt=opt, params=params)
    assert all(torch.equal(a, b) for a, b in zip(params, straight))


def test_switched_on_during_a_run_it_starts_from_one():
    """A group's settings are read at every step; a resume takes them from the checkpoint, as
    torch's optimizers do. Set on a run whose state has no factor yet, it starts at 1."""
    params2, opt2 = _run(_plain, 3)
    opt2.param_groups[0]["lr_growth"] = 1.0
    _run(None, 1, start=3, opt=opt2, params=params2)
    for p in params2:
        assert 1.0 <= float(opt2.state[p]["lr_growth"]) <= math.e


def _plain():
    params = _params()
    return params, Automagic_Sinkgd(params, lr=1e-4, warmup_steps=6)


def test_off_by_default_no_state_and_the_documents_step():
    params, opt = _run(_plain, 4)
    assert opt.param_groups[0]["lr_growth"] is None and opt.param_groups[0]["lr_growth_max"] == 10.0
    assert all("lr_growth" not in opt.state[p] for p in params)


@pytest.mark.parametrize("options, named", [
    (dict(mask_rule="multiplicative", relative_bump=0.2), "mask_rule='multiplicative'")])
def test_fused_with_a_setting_the_kernels_lack_says_so_once_at_construction(options, named):
    """A user who asks for the kernels and sets what they do not implement is told the group
    steps eagerly, instead of timing kernels that never run."""
    p = torch.nn.Parameter(torch.randn(4))
    with pytest.warns(UserWarning, match=rf"fused=True.*{re.escape(named)}.*eager step") as caught:
        Automagic_Sinkgd([p], lr=1e-4, warmup_steps=10, fused=True, **options)
    assert len([w for w in caught if "fused=True" in str(w.message)]) == 1
    assert caught[0].filename == __file__  # points at the user's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Automagic_Sinkgd([p], lr=1e-4, warmup_steps=10, **options)  # fused=None: nothing to say
        Automagic_Sinkgd([p], lr=1e-4, warmup_steps=10, fused=True)  # the kernels cover it
        Automagic_Sinkgd([p], lr=1e-4, warmup_steps=10, fused=True, lr_growth=1.0)  # and the growth factor


def test_the_effective_lr_includes_the_factor():
    p = torch.nn.Parameter(torch.randn(4))
    opt = Automagic_Sinkgd([p], lr=1e-4, lr_bump=0.0, warmup_steps=10, lr_growth=1.0, lr_growth_max=100.0,
                           vradam=False)
    for _ in range(4):
        _set_grads([p], [1.0])
        opt.step()
    assert float(opt.effective_lrs()[0]) == pytest.approx(1e-4 * math.exp(3), rel=1e-5)


def test_the_mask_picture_includes_the_factor():
    """tools/lr_mask_picture.py's per-element rates: the growth factor multiplies them, as the step does."""
    from library.lr_mask_view import effective_rates

    p = torch.nn.Parameter(torch.randn(5))
    opt = Automagic_Sinkgd([p], lr=1e-4, lr_bump=0.0, warmup_steps=10, lr_growth=0.5, vradam=False)
    for _ in range(4):
        _set_grads([p], [1.0])
        opt.step()
    rates = effective_rates(opt.state[p], opt.param_groups[0])
    assert torch.allclose(rates, torch.full((5,), 1e-4 * math.exp(1.5)), rtol=1e-5)


@pytest.mark.parametrize("kwargs, setting", [
    (dict(lr_growth=0), "lr_growth"), (dict(lr_growth=-1.0), "lr_growth"), (dict(lr_growth=11.0), "lr_growth"),
    (dict(lr_growth=True), "lr_growth"), (dict(lr_growth="1"), "lr_growth"),
    (dict(lr_growth=1.0, lr_growth_max=0.5), "lr_growth_max"), (dict(lr_growth_max=math.inf), "lr_growth_max"),
    (dict(lr_growth=1.0, lr_growth_steps=0), "lr_growth_steps"), (dict(lr_growth_steps=2.5), "lr_growth_steps"),
])
def test_bad_values_name_the_setting_and_range(kwargs, setting):
    with pytest.raises(ValueError, match="allowed") as error:
        Automagic_Sinkgd([torch.nn.Parameter(torch.zeros(2))], lr=1e-4, **kwargs)
    assert setting in str(error.value)
