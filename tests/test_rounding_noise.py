"""Stochastic rounding followed one element at a time.

A constant update of half a bf16 ulp goes through the whole optimizer step for many steps:
each element must move one ulp or not at all at each step, and over the run move its expected share
of steps (a binomial count), which holds only if its rounding noise is drawn afresh at every step.
Two tensors with the same values and gradients must round differently (noise per tensor), and a
replica built alike must round bit for bit the same whatever the global RNG (noise from the
(tensor, step) seed alone). The same for the momentum of state_precision="bf16".
"""

import math

import pytest
import torch

from fused_support import fused_kernels_or_skip
from library.automagic_sinkgd import Automagic_Sinkgd

torch.set_num_threads(1)

ULP = 2.0 ** -7  # of a bf16 value in [1, 2)
N = 512          # elements per tensor
# A step that is exactly w - lr * g for a vector: beta1 = 0 (momentum = gradient), Grams on a vector
# gives |m| * sign(g) = g, the mask frozen at lr (lr_bump = 0), no VRAdam brake, no weight decay, no
# Prodigy, and a warm-up longer than the run (no post-warm-up decay).
_CONSTANT_STEP = dict(lr=2.0 ** -10, lr_bump=0.0, beta1=0.0, vradam=False, weight_decay=0.0, d_coef=1,
                      warmup_steps=10_000)
PATHS = ["step", "step_param", "fused"]


def _step(optimizer, params, path):
    if path == "step_param":
        for p in params:
            optimizer.step_param(p, optimizer.param_groups[0])
    else:
        optimizer.step()


def _binomial_band(trials, p, sds=5.0):
    mean, sd = trials * p, math.sqrt(trials * p * (1 - p))
    return mean - sds * sd, mean + sds * sd


def _weight_moves(path, steps, seed=0):
    """Per step and element, how many ulps each of two identical bf16 tensors moved: (steps, 2, N)."""
    torch.manual_seed(seed)  # the global RNG must not matter
    if path == "fused":
        fused_kernels_or_skip()
    params = [torch.nn.Parameter(torch.ones(N, dtype=torch.bfloat16)) for _ in range(2)]
    optimizer = Automagic_Sinkgd(params, fused=path == "fused", **_CONSTANT_STEP)
    # lr * |g| = 2**-8 = half an ulp in [1, 2): a move up with probability exactly 1/2
    grad = torch.full((N,), -4.0, dtype=torch.bfloat16)
    history = []
    for _ in range(steps + 1):  # the first step (ADOPT) only initialises the momentum
        for p in params:
            p.grad = grad.clone()
        _step(optimizer, params, path)
        history.append(torch.stack([p.detach().float() for p in params]))
    history = torch.stack(history)
    return (history[1:] - history[:-1]) / ULP, history[-1]


@pytest.mark.parametrize("path", PATHS)
def test_a_half_ulp_update_moves_each_bf16_weight_half_of_the_steps(path):
    steps = 40 if path == "fused" else 120  # Triton's interpreter is slow; 40 still separates 0 and 40
    moves, final = _weight_moves(path, steps)
    assert final.max() < 2.0  # one binade throughout: the ulp stays 2**-7
    assert torch.equal(moves.clamp(0, 1), moves) and torch.equal(moves.round(), moves), \
        "each step must round to one of the two neighbours: 0 or 1 ulp up"
    counts = moves.sum(dim=0)  # (2, N): each element's own number of moves
    low, high = _binomial_band(steps, 0.5)
    outside = ((counts < low) | (counts > high)).sum().item()
    assert outside == 0, (f"{outside} of {2 * N} elements moved a number of times outside the binomial band "
                          f"[{low:.0f}, {high:.0f}] of {steps} steps at p = 1/2 (min {counts.min():.0f}, "
                          f"max {counts.max():.0f}): the rounding noise does not change from step to step")
    # Over all elements the average movement is the update itself, within 2 %.
    assert counts.mean().item() == pytest.approx(steps / 2, rel=0.02)
    # Per tensor: the same values and gradients in two tensors must not round alike. Independent
    # noise agrees where both move or both stay: half of the (step, element) pairs.
    agree = (moves[:, 0] == moves[:, 1]).float().mean().item()
    assert agree == pytest.approx(1 / 2, abs=0.03), f"two tensors round alike in {agree:.1%} of the cases"


@pytest.mark.parametrize("path", ["step", "fused"])
def test_a_replica_rounds_each_element_the_same(path):
    """Data-parallel replicas see the same gradients and must stay bit-identical: the noise comes
    from the (tensor, step) seed, not from the global RNG, which differs between the two runs here."""
    steps = 10
    _, first = _weight_moves(path, steps, seed=0)
    _, second = _weight_moves(path, steps, seed=12345)
    assert torch.equal(first, second)
    assert not torch.equal(first[0], first[1])  # and yet the two tensors of one run differ


# ------------------------------------------------------------------ the momentum of a bf16 state

BETA1 = 1 - 2.0 ** -10  # momentum' = m + 2**-10 (g - m): exact in float32 for m in [1, 2), g = 5
_MOMENTUM = dict(lr=1e-4, lr_bump=1e-5, beta1=BETA1, weight_decay=0.0, d_coef=1, warmup_steps=10_000,
                 state_precision="bf16")


def _momentum_history(path, steps, seed=0):
    """The stored bf16 momentum of two identical float32 tensors at every step: (steps + 1, 2, N)."""
    if path == "fused":
        fused_kernels_or_skip()
    torch.manual_seed(seed)
    params = [torch.nn.Parameter(torch.zeros(N)) for _ in range(2)]
    optimizer = Automagic_Sinkgd(params, fused=path == "fused", **_MOMENTUM)
    grad = torch.full((N,), 5.0)
    for p in params:
        p.grad = grad.clone()
    _step(optimizer, params, path)
    for p in params:  # start every element's momentum at 1.0: its update is then (5 - m) / 1024
        optimizer.state[p]["exp_avg"].fill_(1.0)
    history = [torch.stack([optimizer.state[p]["exp_avg"].float() for p in params])]
    for _ in range(steps):
        for p in params:
            p.grad = grad.clone()
        _step(optimizer, params, path)
        history.append(torch.stack([optimizer.state[p]["exp_avg"].float() for p in params]))
    return torch.stack(history)


@pytest.mark.parametrize("path", PATHS)
def test_the_bf16_momentum_of_each_element_moves_as_often_as_its_update_says(path):
    steps = 30 if path == "fused" else 120
    history = _momentum_history(path, steps)
    before, after = history[:-1], history[1:]
    assert before.min() >= 1.0 and after.max() < 2.0  # one binade: the ulp stays 2**-7
    exact = before + (5.0 - before) * 2.0 ** -10  # the float32 momentum before rounding, exact here
    p_up = (exact - before) / ULP                  # the chance of rounding up: a half, then less
    assert p_up.max() <= 0.5 and p_up.min() > 0.35
    moves = (after - before) / ULP
    assert torch.equal(moves.clamp(0, 1), moves) and torch.equal(moves.round(), moves), \
        "each step must round to one of the two neighbours of the float32 momentum"
    counts, expected = moves.sum(dim=0), p_up.sum(dim=0)
    sd = (p_up * (1 - p_up)).sum(dim=0).sqrt()
    worst = ((counts - expected).abs() / sd).max().item()
    assert worst < 5, (f"an element's momentum rounded up {worst:.1f} standard deviations away from its "
                       "expected count: the rounding noise does not change from step to step")
    agree = (moves[:, 0] == moves[:, 1]).float().mean().item()
    p = p_up.mean().item()
    assert agree == pytest.approx(1 - 2 * p * (1 - p), abs=0.03), "two tensors' momentum rounds alike"
    # and a replica with another global RNG rounds it bit for bit alike
    assert torch.equal(_momentum_history(path, 5, seed=999)[-1], history[5])
