"""The opt-in multiplicative (Rprop) mask rule, mask_rule="multiplicative": one move multiplies or
divides an element's lr by 1 + relative_bump. The default ("additive") is the document's step,
which the conformance tests check; set, the rule must move each element by exactly its factor,
be validated with the setting's name and range, survive a resume bit for bit, and keep the fused
flag from taking a kernel that implements only the additive rule."""

import io
import math

import pytest
import torch

from library.automagic_sinkgd import Automagic_Sinkgd, automagic_mask_update_, decode_lr_mask, rprop_mask_update_

torch.set_num_threads(1)


def test_rprop_update_multiplies_on_agreement_and_divides_on_a_flip():
    mask = torch.tensor([[1e-4, 1e-4, 1e-2, 1e-6]])
    flips = torch.tensor([[0.0, 1.0, 0.0, 1.0]])
    up, down = torch.tensor([1.5]).log(), torch.tensor([1.25]).log()  # moves in log(lr)
    rprop_mask_update_(mask, flips, up, down, 1e-6, 1e-2)
    expected = torch.tensor([[1.5e-4, 1e-4 / 1.25, 1e-2, 1e-6]])  # the last two clamp at the bounds
    assert torch.allclose(mask, expected, rtol=1e-6)


def test_a_move_is_relative_to_the_element_not_to_the_group():
    """Additive: an element 100x below another moves by the same amount; multiplicative: by the
    same factor, so both cover a decade in the same number of steps."""
    start = torch.tensor([[1e-5, 1e-3]])
    flips = torch.zeros(1, 2)
    additive = automagic_mask_update_(start.clone(), flips.clone(), torch.tensor([1e-5]), torch.tensor([1e-5]), 0, 1)
    step = torch.tensor([1.1]).log()
    multiplicative = rprop_mask_update_(start.clone(), flips.clone(), step, step, 0, 1)
    assert torch.allclose(additive - start, torch.full((1, 2), 1e-5))
    assert torch.allclose(multiplicative / start, torch.full((1, 2), 1.1))


def _steps(params, optimizer, signs):
    for sign in signs:
        for p in params:
            p.grad = sign * torch.ones_like(p)
        optimizer.step()


def test_the_optimizer_moves_its_mask_by_the_factor():
    """Steady gradient signs: after the initialising step, each warm-up step multiplies every
    element's lr by 1 + relative_bump (d_coef 1: no Prodigy speed-up); a sign flip divides it.
    With the Prodigy speed-up a move is (1 + relative_bump) ** d_coef."""
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))]
    opt = Automagic_Sinkgd(params, lr=1e-4, min_lr=1e-6, max_lr=1e-1, d_coef=1, warmup_steps=100,
                           mask_rule="multiplicative", relative_bump=0.2, weight_decay=0.0)
    _steps(params, opt, [1.0] * 4)  # step 1 initialises the state, steps 2-4 agree
    for p in params:
        assert torch.allclose(opt.state[p]["lr_mask"], torch.full(p.shape, 1e-4 * 1.2 ** 3), rtol=1e-5)
    _steps(params, opt, [-1.0])  # every sign flips
    for p in params:
        assert torch.allclose(opt.state[p]["lr_mask"], torch.full(p.shape, 1e-4 * 1.2 ** 2), rtol=1e-5)
    # d_coef=2: the Prodigy signal (weights moved against the gradient) doubles the move in log(lr)
    p = torch.nn.Parameter(torch.zeros(4, 3))
    opt = Automagic_Sinkgd([p], lr=1e-4, min_lr=1e-6, max_lr=1e-1, d_coef=2, warmup_steps=100,
                           mask_rule="multiplicative", relative_bump=0.2, weight_decay=0.0)
    _steps([p], opt, [1.0] * 3)  # step 2 moves p against its gradient, so step 3 sees the signal
    assert torch.allclose(opt.state[p]["lr_mask"], torch.full((4, 3), 1e-4 * 1.2 * 1.2 ** 2), rtol=1e-5)


def test_the_default_rule_is_the_documents_additive_one():
    params = [torch.nn.Parameter(torch.randn(4, 3))]
    opt = Automagic_Sinkgd(params, lr=1e-4, d_coef=1, lr_bump=1e-5, weight_decay=0.0)
    assert opt.param_groups[0]["mask_rule"] == "additive"
    _steps(params, opt, [1.0] * 4)
    assert torch.allclose(opt.state[params[0]]["lr_mask"], torch.full((4, 3), 1e-4 + 3e-5), rtol=1e-6)


@pytest.mark.parametrize("kwargs, setting", [
    (dict(mask_rule="log"), "mask_rule"),
    (dict(mask_rule="multiplicative"), "relative_bump"),  # the factor is relative_bump: it must be set
    (dict(mask_rule="multiplicative", relative_bump=0.0), "relative_bump"),
    (dict(mask_rule="multiplicative", relative_bump=0.1, state_precision="bf16", min_lr=0.0), "min_lr"),
    (dict(mask_rule="multiplicative", relative_bump=1e-6, state_precision="bf16"), "relative_bump"),  # too fine for 16 bits
])
def test_bad_values_name_the_setting_and_range(kwargs, setting):
    with pytest.raises(ValueError, match="allowed") as error:
        Automagic_Sinkgd([torch.nn.Parameter(torch.zeros(2))], lr=1e-4, **kwargs)
    assert setting in str(error.value)


def test_resume_continues_bit_for_bit():
    def fresh():
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(4))]
        return params, Automagic_Sinkgd(params, lr=1e-4, max_lr=1e-1, warmup_steps=6, mask_rule="multiplicative",
                                        relative_bump=0.2)

    def run(params, opt, start, count):
        for step in range(start, start + count):
            g = torch.Generator().manual_seed(step)
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()

    params, opt = fresh()
    run(params, opt, 0, 10)
    straight = [p.detach().clone() for p in params]
    params, opt = fresh()
    run(params, opt, 0, 4)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    saved = [p.detach().clone() for p in params]
    params, opt = fresh()
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
    buffer.seek(0)
    opt.load_state_dict(torch.load(buffer, weights_only=True))
    assert opt.param_groups[0]["mask_rule"] == "multiplicative"
    run(params, opt, 4, 6)
    assert all(torch.equal(a, b) for a, b in zip(params, straight))


def test_fused_flag_takes_the_eager_step(monkeypatch):
    """The kernels implement the additive rule only: fused=True with the multiplicative rule must
    give the eager step's numbers (never the additive kernel's)."""
    def run(fused):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(8, 6))]
        opt = Automagic_Sinkgd(params, lr=1e-4, max_lr=1e-1, warmup_steps=4, mask_rule="multiplicative",
                               relative_bump=0.2, fused=fused)
        for step in range(6):
            params[0].grad = torch.randn(8, 6, generator=torch.Generator().manual_seed(step))
            opt.step()
        return params[0].detach()

    with pytest.warns(UserWarning, match="eager step"):
        fused = run(True)
    assert torch.equal(fused, run(False))


def test_a_bf16_state_keeps_every_multiplicative_move():
    """The compact state's 16-bit mask on a log(lr) lattice: after 60 agreeing and flipping moves
    and the clamp, the same mask as the fp32 state, to within the half lattice step the start lr
    is rounded by (the moves are whole lattice steps, so the error never grows)."""
    def run(precision):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(6, 5) * 0.1), torch.nn.Parameter(torch.randn(5) * 0.1)]
        opt = Automagic_Sinkgd(params, lr=1e-4, min_lr=1e-6, max_lr=3e-3, warmup_steps=80, d_coef=1,
                               mask_rule="multiplicative", relative_bump=0.2, state_precision=precision)
        g = torch.Generator().manual_seed(3)
        for step in range(60):
            for p in params:  # the same signs for both runs: most elements climb to max_lr, some flip
                p.grad = torch.randn(p.shape, generator=g) + 1.2
            opt.step()
        return opt, params

    fp32, reference_params = run("fp32")
    compact, params = run("bf16")
    codec = compact.state[params[0]]["lr_mask_codec"]
    assert codec[2] == "log"
    half_step = math.exp(codec[1] / 2) - 1
    climbed = flipped = 0
    for p, q in zip(reference_params, params):
        reference = fp32.state[p]["lr_mask"]
        assert compact.state[q]["lr_mask"].dtype == torch.uint16
        decoded = decode_lr_mask(compact.state[q]["lr_mask"], codec)
        assert torch.allclose(decoded, reference, rtol=half_step * 1.01, atol=0)
        climbed += int((reference >= 3e-3 * (1 - 1e-6)).sum())
        flipped += int((reference < 3e-3 * (1 - 1e-6)).sum())
    assert climbed and flipped  # both the clamp and the flips were exercised


def test_annealed_move_is_constant_then_inverse_sqrt_and_whole_lattice_steps():
    from library.automagic_sinkgd import annealed_log_bump

    move = math.log1p(0.5)
    assert annealed_log_bump(move, None, 1000, 0.0) == move  # no decay: the constant move
    assert annealed_log_bump(move, 10, 10, 0.0) == move
    assert annealed_log_bump(move, 10, 40, 0.0) == pytest.approx(move / 2)
    lattice = move / 1000
    rounded = annealed_log_bump(move, 10, 33, lattice)
    assert rounded / lattice == pytest.approx(round(rounded / lattice), abs=1e-9)
    assert rounded == pytest.approx(move * math.sqrt(10 / 33), rel=1e-3)
    assert annealed_log_bump(move, 10, 10 ** 12, lattice) == lattice  # never rounded away to 0


def test_the_optimizer_anneals_its_moves():
    """mask_bump_decay=2: full-size moves up to step 2, then shrinking as sqrt(2 / t)."""
    p = torch.nn.Parameter(torch.zeros(3, 2))
    opt = Automagic_Sinkgd([p], lr=1e-4, min_lr=1e-6, max_lr=1.0, d_coef=1, warmup_steps=100, weight_decay=0.0,
                           mask_rule="multiplicative", relative_bump=0.5, mask_bump_decay=2)
    _steps([p], opt, [1.0] * 8)  # step 1 initialises; steps 2 .. 8 agree
    log_moves = sum(math.log1p(0.5) * min(1.0, math.sqrt(2 / t)) for t in range(2, 9))
    assert torch.allclose(opt.state[p]["lr_mask"], torch.full((3, 2), 1e-4 * math.exp(log_moves)), rtol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(mask_bump_decay=10), dict(mask_rule="multiplicative", relative_bump=0.2,
                                                                   mask_bump_decay=0)])
def test_a_bad_bump_decay_names_the_setting(kwargs):
    with pytest.raises(ValueError, match="mask_bump_decay.*allowed"):
        Automagic_Sinkgd([torch.nn.Parameter(torch.zeros(2))], lr=1e-4, **kwargs)

