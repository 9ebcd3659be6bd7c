"""The opt-in schedule settings added after the document: relative_bump, decay_horizon,
decay_floor and total_steps. Their defaults must give the document's step (the conformance test
in test_automagic_sinkgd.py checks that step itself); set, they must do what they say, be
validated with the setting's name and range, and survive a resume bit for bit."""

import io

import pytest
import torch

from library.automagic_sinkgd import (
    Automagic_Sinkgd,
    post_warmup_decay,
    post_warmup_decay_rate,
    relative_lr_bump,
)

torch.set_num_threads(1)


def _params(seed=0):
    torch.manual_seed(seed)
    shapes = [(8, 12), (12, 4), (5, 3, 3, 3), (12,)]
    return [torch.nn.Parameter(torch.randn(s) * 0.1) for s in shapes]


def _grads(params, step):
    generator = torch.Generator().manual_seed(500 + step)
    for p in params:
        p.grad = (torch.randn(p.shape, generator=generator) * 1e-3).to(p.dtype)


def _run(params, optimizer, steps, start=0):
    for step in range(start, start + steps):
        _grads(params, step)
        optimizer.step()


@pytest.mark.parametrize("kwargs, setting", [
    (dict(relative_bump=-0.1), "relative_bump"), (dict(relative_bump=1.5), "relative_bump"),
    (dict(relative_bump=True), "relative_bump"), (dict(decay_floor=-0.1), "decay_floor"),
    (dict(decay_floor=1.5), "decay_floor"), (dict(total_steps=0), "total_steps"),
    (dict(total_steps=10.5), "total_steps"), (dict(decay_horizon="cosine"), "decay_horizon"),
    (dict(decay_horizon="run"), "decay_horizon"),  # "run" needs total_steps
    (dict(relative_bump=0.2, state_precision="bf16"), "relative_bump"),  # the compact mask's lattice is lr_bump
])
def test_bad_values_name_the_setting_and_range(kwargs, setting):
    with pytest.raises(ValueError, match="allowed") as error:
        Automagic_Sinkgd([torch.nn.Parameter(torch.zeros(2))], **kwargs)
    assert setting in str(error.value)


def test_a_bad_value_in_one_group_names_the_group():
    with pytest.raises(ValueError, match=r"decay_floor \(param group 1\)"):
        Automagic_Sinkgd([{"params": [torch.nn.Parameter(torch.zeros(2))]},
                          {"params": [torch.nn.Parameter(torch.zeros(2))], "decay_floor": 2.0}])


def test_pure_formulas():
    assert relative_lr_bump(1e-5, None, 5e-5) == 1e-5
    assert relative_lr_bump(1e-5, 0.1, 5e-5) == pytest.approx(5e-6)
    one, half = torch.tensor(1.0), torch.tensor(0.5)
    assert post_warmup_decay_rate(one, one, 100).item() == pytest.approx(1 / 100)
    assert post_warmup_decay_rate(half, one, 100, "run", 500).item() == pytest.approx(0.5 / 401)  # steps 100..500
    assert post_warmup_decay_rate(one, one, 100, "run", 50).item() == pytest.approx(1.0)  # horizon >= 1
    lr_decay = torch.tensor([0.9, 0.05, -0.2])
    torch.testing.assert_close(post_warmup_decay(lr_decay, 1.0, 0.0), torch.tensor([0.9, 0.05, 0.0]))
    torch.testing.assert_close(post_warmup_decay(lr_decay, 1.0, 1.0), torch.tensor([1.0, 1.0, 1.0]))


def test_explicit_defaults_give_the_documents_step():
    """total_steps is only read by decay_horizon="run": passing it alone changes nothing."""
    a, b = _params(), _params()
    plain = Automagic_Sinkgd(a, lr=1e-4, max_lr=1e-3, warmup_steps=6, orthograd=True)
    explicit = Automagic_Sinkgd(b, lr=1e-4, max_lr=1e-3, warmup_steps=6, orthograd=True, relative_bump=None,
                                decay_horizon="warmup", decay_floor=0.1, total_steps=20)
    _run(a, plain, 20)
    _run(b, explicit, 20)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_relative_bump_is_a_per_group_lr_bump():
    """Two groups at 10x different lrs: relative_bump=0.2 moves each mask by 0.2 x its own lr."""
    a, b = _params(), _params()
    relative = Automagic_Sinkgd([{"params": a[:2], "lr": 1e-4}, {"params": a[2:], "lr": 1e-3}],
                                max_lr=1e-2, warmup_steps=8, relative_bump=0.2)
    absolute = Automagic_Sinkgd([{"params": b[:2], "lr": 1e-4, "lr_bump": 2e-5},
                                 {"params": b[2:], "lr": 1e-3, "lr_bump": 2e-4}], max_lr=1e-2, warmup_steps=8)
    _run(a, relative, 6)
    _run(b, absolute, 6)
    for p, q in zip(a, b):
        assert torch.equal(p, q)
        assert torch.equal(relative.state[p]["lr_mask"], absolute.state[q]["lr_mask"])
    # and the mask did move, by a multiple of the group's own bump
    moved = relative.state[a[2]]["lr_mask"] - 1e-3
    assert moved.abs().max() > 1e-4


def test_relative_bump_follows_the_schedulers_base_lr():
    """Under an LR scheduler with warm-up, lr is 0 at first: the bump comes from initial_lr."""
    a = _params()
    optimizer = Automagic_Sinkgd(a, lr=1e-4, max_lr=1e-2, warmup_steps=8, relative_bump=0.5)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, s / 4))
    _run(a, optimizer, 3)
    steps = torch.stack([(optimizer.state[p]["lr_mask"] - 1e-4).abs().max() for p in a])
    assert steps.max() > 0
    del scheduler


def test_decay_over_the_run_reaches_zero_at_total_steps():
    total, warmup = 20, 6
    params = _params()
    # lr_bump=0 keeps the mask at lr, so the decay's slope is exactly 1 / (total - warmup + 1): the
    # steps warmup .. total each decay before they update
    optimizer = Automagic_Sinkgd(params, lr=1e-4, max_lr=1e-3, lr_bump=0.0, warmup_steps=warmup,
                                 decay_horizon="run", total_steps=total, decay_floor=0.0, vradam=False, allora=False)
    _run(params, optimizer, warmup + 6)
    expected = 1.0 - 7 / (total - warmup + 1)  # the decay started at t = warmup: 7 steps so far
    assert optimizer.effective_lrs()[0].item() == pytest.approx(1e-4 * expected, rel=1e-5)
    _run(params, optimizer, total - warmup - 7, start=warmup + 6)  # to t = total - 1
    assert optimizer.effective_lrs()[0].item() == pytest.approx(1e-4 / (total - warmup + 1), rel=1e-4)
    _run(params, optimizer, 1, start=total - 1)  # t = total: 0 at the last planned step, not before
    assert optimizer.effective_lrs()[0].item() < 1e-4 * 1e-6  # zero up to float32 rounding of the slope
    before = [p.detach().clone() for p in params]
    _run(params, optimizer, 1, start=total)  # past total_steps: the floor (0) holds
    assert all(torch.equal(p, q) for p, q in zip(params, before))


def test_document_decay_floors_at_a_tenth_after_another_warmup():
    params = _params()
    optimizer = Automagic_Sinkgd(params, lr=1e-4, max_lr=1e-3, lr_bump=0.0, warmup_steps=6, vradam=False, allora=False)
    _run(params, optimizer, 20)
    assert optimizer.effective_lrs()[0].item() == pytest.approx(1e-5, rel=1e-5)


def test_floor_one_means_no_decay():
    params = _params()
    optimizer = Automagic_Sinkgd(params, lr=1e-4, max_lr=1e-3, lr_bump=0.0, warmup_steps=6, vradam=False, allora=False,
                                 decay_floor=1.0)
    _run(params, optimizer, 30)
    assert optimizer.effective_lrs()[0].item() == pytest.approx(1e-4, rel=1e-5)


CONFIG = dict(lr=1e-4, max_lr=1e-3, warmup_steps=6, orthograd=True, relative_bump=0.3, decay_horizon="run",
              total_steps=18, decay_floor=0.0)


@pytest.mark.parametrize("resume_at", [3, 7, 12])
def test_resume_with_the_new_settings_is_bit_identical(resume_at):
    straight = _params()
    optimizer = Automagic_Sinkgd(straight, **CONFIG)
    _run(straight, optimizer, 18)

    first = _params()
    optimizer = Automagic_Sinkgd(first, **CONFIG)
    _run(first, optimizer, resume_at)
    buffer = io.BytesIO()
    torch.save({"optimizer": optimizer.state_dict(), "params": [p.detach() for p in first]}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = [torch.nn.Parameter(t.clone()) for t in saved["params"]]
    # constructed with the document's settings: the saved groups win, as for every setting
    optimizer = Automagic_Sinkgd(resumed, lr=1e-4, max_lr=1e-3, warmup_steps=6, orthograd=True)
    optimizer.load_state_dict(saved["optimizer"])
    assert optimizer.param_groups[0]["decay_horizon"] == "run"
    _run(resumed, optimizer, 18 - resume_at, start=resume_at)
    assert all(torch.equal(p, q) for p, q in zip(straight, resumed))


def test_a_state_saved_before_the_new_settings_loads_as_the_document():
    a = _params()
    optimizer = Automagic_Sinkgd(a, lr=1e-4, max_lr=1e-3, warmup_steps=6)
    _run(a, optimizer, 4)
    old = optimizer.state_dict()
    for group in old["param_groups"]:
        for key in ("relative_bump", "decay_horizon", "decay_floor", "total_steps"):
            del group[key]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    resumed = Automagic_Sinkgd(b, lr=1e-4, max_lr=1e-3, warmup_steps=6)
    resumed.load_state_dict(old)
    assert resumed.param_groups[0]["decay_floor"] == 0.1 and resumed.param_groups[0]["decay_horizon"] == "warmup"
    _run(a, optimizer, 12, start=4)
    _run(b, resumed, 12, start=4)
    assert all(torch.equal(p, q) for p, q in zip(a, b))


@pytest.mark.parametrize("device", ["cpu", "meta"])  # meta: a copy to the host is a real copy there
@pytest.mark.parametrize("per_param", [False, True])
def test_no_host_sync_with_the_new_settings(per_param, device):
    from host_sync import copy_grads, no_host_sync, on_device
    from test_automagic_sinkgd import _step_all

    grads_from = _params()
    params = on_device(grads_from, device)
    optimizer = Automagic_Sinkgd(params, **CONFIG)
    for step in range(10):  # warm-up, then the decay over the run
        _grads(grads_from, step)
        copy_grads(grads_from, params)
        with no_host_sync():
            _step_all(optimizer, params, per_param=per_param)
