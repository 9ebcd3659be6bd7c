"""The gradient-aware weight decay and the group statistics it reads, step by step against the
independent reference (spec_reference.py), with a weight decay large enough to be a sizeable part
of each step and gradients whose scale differs between tensors (so theta spreads over (0, 2)).

Each step's update w_t - w_(t-1) is compared, not the weights: the decay moves a weight by a small
fraction of its value, which a tolerance on the weights themselves would hide. Through step() the
statistics of a refresh step are the current gradients'; through step_param() (kohya's
--fused_backward_pass) they are gathered while the refresh step runs and used from the next step on,
theta = 1 before the first set. The fused kernels (Triton's interpreter here) are held to the same.
"""

import pytest
import torch

from fused_support import fused_kernels_or_skip
from library.automagic_sinkgd import Automagic_Sinkgd
from spec_reference import ReferenceAutomagic

torch.set_num_threads(1)

# warm-up 16: the decay and the statistics act in its first half (t = 2 .. 7); refreshed at
# t = 1, 3, 5, 7. lr 5e-3 and weight_decay 1 make the decay's move of a tensor 9 % to several
# times the size of the rest of its update.
CONFIG = dict(lr=5e-3, min_lr=1e-4, max_lr=1e-2, lr_bump=5e-4, warmup_steps=16, weight_decay=1.0,
              stats_update_freq=2, d_coef=2, beta1=0.9)
STEPS = 8
SHAPES = [(8, 16), (8, 16), (16, 8), (5, 3, 2, 2), (16,), (8,)]
SCALES = [1.0, 0.1, 3.0, 0.3, 10.0, 0.03]  # each tensor's gradient scale: z-scores far from 0


def _weights(dtype):
    generator = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=generator, dtype=torch.float64).mul_(0.5).to(dtype) for s in SHAPES]


def _grads(step):
    """Independent of the weights (so both sides see the same gradients), scale varying by tensor
    and by step (so the statistics change between refreshes)."""
    generator = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=generator, dtype=torch.float64) * scale * (1 + 0.5 * (step % 3))
            for s, scale in zip(SHAPES, SCALES)]


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("per_param", [False, True], ids=["step", "step_param"])
def test_decay_and_statistics_match_the_reference_at_every_step(per_param, fused):
    # The eager step in float64 (its math follows the weights' dtype): only the statistics are
    # float32, so the two sides agree to ~1e-7 of an update. The kernels run float32 weights.
    if fused:
        fused_kernels_or_skip()
    dtype = torch.float32 if fused else torch.float64
    params = [torch.nn.Parameter(w) for w in _weights(dtype)]
    ref_params = [torch.nn.Parameter(w) for w in _weights(torch.float64)]
    optimizer = Automagic_Sinkgd(params, fused=fused, **CONFIG)
    reference = ReferenceAutomagic(ref_params, stats_lag=per_param, **CONFIG)
    group = optimizer.param_groups[0]
    # tolerance on each element, as a share of its tensor's largest update this step
    tolerance = 1e-3 if fused else 1e-6
    thetas, decay_shares = [], []
    for step in range(STEPS):
        before = [p.detach().double().clone() for p in params]
        ref_before = [q.detach().clone() for q in ref_params]
        for p, q, g in zip(params, ref_params, _grads(step)):
            p.grad, q.grad = g.to(dtype), g.clone()
        if per_param:
            for p in params:
                optimizer.step_param(p, group)
        else:
            optimizer.step()
        reference.step()

        # the statistics this step used
        if reference.stats_used is None:
            assert "grad_abs_mean" not in group, "statistics used before any were gathered"
        else:
            torch.testing.assert_close(group["grad_abs_mean"].double(), reference.stats_used[0], rtol=1e-6, atol=0)
            torch.testing.assert_close(group["grad_abs_std"].double(), reference.stats_used[1], rtol=1e-6, atol=0)
        # each tensor's update, decay included
        for i, (p, q, w0, r0) in enumerate(zip(params, ref_params, before, ref_before)):
            update, expected = p.detach().double() - w0, q.detach() - r0
            if step == 0:  # ADOPT's first step only initialises the state
                assert not update.any() and not expected.any()
                continue
            worst = ((update - expected).abs().max() / expected.abs().max()).item()
            assert worst < tolerance, (f"step {step + 1}, tensor {i} {tuple(p.shape)}: the update differs from "
                                       f"the reference's by {worst:.2e} of its largest element")
            state = reference.state[q]
            if "decay" in state and state["t"] == step + 1:
                thetas.append(state["theta"])
                # the decay's move of the tensor against its whole update
                decay_shares.append(state["decay"] * r0.abs().sum().item() / (q.detach() - r0).abs().sum().item())
    # The check had something to see: the decay acted with strengths far from 1, and made up a
    # part of the update far larger than the tolerance.
    assert min(thetas) < 0.3 and max(thetas) > 1.8, (min(thetas), max(thetas))
    assert max(decay_shares) > 1 and min(decay_shares) > 10 * tolerance, (min(decay_shares), max(decay_shares))

