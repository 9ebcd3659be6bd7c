"""The fused Triton step (``fused=True``) against the eager step, its reference.

On a machine with CUDA the kernels run on the GPU; elsewhere tests/conftest.py sets
TRITON_INTERPRET=1 and Triton's interpreter runs them on CPU tensors. Shapes are small (the
interpreter runs each program in Python) but span several tiles in both directions, so the tile
loops, their masks and the multi-tensor stacks are all exercised. Every phase is covered by
warmup_steps=8: t=2, 3 early warm-up (Prodigy signal, weight decay), t=4..7 late warm-up, t=8 the
first post-warm-up step, t>=9 post-warm-up with OrthoGrad.
"""

import math
import sys
import warnings

import pytest
import torch

from library import automagic_sinkgd as core
from library.automagic_sinkgd import Automagic_Sinkgd

try:
    from library import automagic_sinkgd_kernels as kernels
except ImportError as error:  # no Triton on this machine
    pytest.skip(f"Triton cannot be imported ({error}): the fused kernels are not tested here",
                allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and not kernels.interpreting():
    pytest.skip("no CUDA device and TRITON_INTERPRET is not 1 (tests/conftest.py sets it when it "
                "runs first): the kernels cannot run here", allow_module_level=True)

torch.set_num_threads(1)

# Two of each matrix shape (a stacked bucket) plus lone ones; (4, 300) spans three column tiles,
# (300, 3) three row tiles, (2100,) two vector tiles; a 1x1 conv; vectors.
LORA_SHAPES = [(4, 24), (4, 24), (24, 4), (24, 4), (4, 300), (300, 3), (4, 6, 1, 1), (10,), (10,), (2100,)]
FULL_SHAPES = [(12, 10), (12, 10), (6, 3, 3, 3), (70, 3), (33,), (1,)]
PHASES = dict(lr=1e-3, min_lr=1e-4, max_lr=1e-2, lr_bump=2e-4, warmup_steps=8, orthograd=True,
              weight_decay=0.1, stats_update_freq=2)


def _params(shapes, dtype=torch.float32, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=generator) * 0.1).to(DEVICE, dtype)) for s in shapes]


def _grads(params_sets, generator, nan_at=None, drift=0.0):
    """The same fresh gradient for the matching parameter of every set; ``drift`` is added to every
    other tensor's, which then keeps agreeing with its momentum (lr_growth climbs there)."""
    for i, group in enumerate(zip(*params_sets)):
        grad = torch.randn(group[0].shape, generator=generator) + (drift if i % 2 == 0 else 0.0)
        grad = grad.to(DEVICE, group[0].dtype)
        if nan_at is not None and i == nan_at:
            grad.view(-1)[1] = float("nan")
        for p in group:
            p.grad = grad.clone()


compact_agreement = [0, 0]  # bit-equal and compared elements of compact state, see _lockstep


def _assert_states_close(eager, fused, eager_params, fused_params, rtol=2e-5):
    for p, q in zip(eager_params, fused_params):
        for key, value in eager.state[p].items():
            other = fused.state[q][key]
            if torch.is_tensor(value):
                assert other.dtype == value.dtype and other.shape == value.shape, key
                if value.dtype in (torch.bool, torch.uint8):  # sign history, as booleans or packed bits
                    assert torch.equal(value, other), key
                elif value.dtype in (torch.bfloat16, torch.uint16):
                    # A compact state: both paths round from the same noise table onto the same
                    # lattice, so they agree bit for bit except where float32 arithmetic left the two
                    # values on either side of a rounding boundary: then one bf16 step or one code
                    # (near 0, where a momentum's lerp cancels, the step of a far smaller value).
                    a, b = value.float(), other.float()
                    near_zero = 2.0**-20 * a.abs().max() if value.dtype == torch.bfloat16 else 0.0
                    one_step = (torch.maximum(a.abs(), b.abs()) * 2.0**-7 + near_zero
                                if value.dtype == torch.bfloat16 else torch.ones_like(a))
                    assert ((a - b).abs() <= one_step).all(), f"state {key} of {tuple(p.shape)}"
                    # counted over the whole run (a small tensor may hold one unlucky element),
                    # leaving out momenta that cancelled to ~0 on one path and exactly 0 on the other
                    counted = torch.maximum(a.abs(), b.abs()) > near_zero
                    compact_agreement[0] += (a == b)[counted].sum().item()
                    compact_agreement[1] += counted.sum().item()
                else:
                    torch.testing.assert_close(other, value, rtol=rtol, atol=rtol * value.abs().max().item(),
                                               msg=lambda m: f"state {key} of {tuple(p.shape)}: {m}")
            else:
                assert value == other, key


def _lockstep(shapes, steps, dtype=torch.float32, nan_at=None, resync=False, drift=0.0, **settings):
    """Eager and fused optimizers on identical parameters and gradients, compared after every step
    (weights as this step's update, which is ~1e-3 of the weights, state element by element).
    ``resync``: the fused optimizer restarts every step from the eager one's state and weights, so
    a rare rounding difference of a compact state is compared once instead of compounding."""
    eager_params, fused_params = _params(shapes, dtype), _params(shapes, dtype)
    eager = Automagic_Sinkgd(eager_params, fused=False, **settings)
    fused = Automagic_Sinkgd(fused_params, fused=True, **settings)
    generator = torch.Generator().manual_seed(2)
    launches_before = kernels.launches.get("bucket_step", 0)
    compact_agreement[:] = [0, 0]
    for step in range(1, steps + 1):
        _grads([eager_params, fused_params], generator, nan_at=nan_at if step == 3 else None, drift=drift)
        for optimizer in (eager, fused):  # an outside scheduler: the decay's cap, then its 0.1 floor
            optimizer.param_groups[0]["lr"] = settings["lr"] * {9: 0.5, 10: 0.05}.get(step, 1.0)
        before = [p.detach().clone() for p in eager_params]
        eager.step()
        fused.step()
        for p, q, w in zip(eager_params, fused_params, before):
            delta, fused_delta = (p - w).float(), (q - w).float()
            scale = delta.abs().max().item()
            # (bf16 weights may keep every element of a small tensor when the update is a fraction of a bf16 step)
            assert scale > 0 or step == 1 or nan_at is not None or dtype != torch.float32, \
                "the eager step did not move this tensor"
            weight_ulp = torch.finfo(torch.float32).eps * w.float().abs().max().item()  # deltas are multiples
            torch.testing.assert_close(fused_delta, delta, rtol=0, atol=1e-4 * scale + 2 * weight_ulp,
                                       msg=lambda m: f"step {step}, {tuple(p.shape)}: {m}")
        _assert_states_close(eager, fused, eager_params, fused_params)
        if resync:
            fused.load_state_dict(eager.state_dict())
            with torch.no_grad():
                for p, q in zip(eager_params, fused_params):
                    q.copy_(p)
    assert kernels.launches.get("bucket_step", 0) > launches_before, "the fused kernel never ran"
    same, compared = compact_agreement
    assert same >= 0.995 * compared, f"compact state: {compared - same} of {compared} elements differ"
    return eager, fused, eager_params, fused_params


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_fused_step_matches_eager_in_every_phase(mode):
    full = mode == "full"
    _lockstep(FULL_SHAPES if full else LORA_SHAPES, steps=10, full_finetune=full, **PHASES)


@pytest.mark.parametrize("settings", [
    dict(sinkgd_iters=0),                       # OrthoGrad with its norm restore
    dict(grams=False, vradam=False, allora=False),
    dict(d_coef=1.0, beta1=0.3),                # no Prodigy signal; torch.lerp's second branch
    dict(weight_decay=0.0, sinkgd_iters=1),
], ids=["orthograd-keep-norm", "ablations", "no-signal-lerp", "no-decay-1-iter"])
def test_fused_step_matches_eager_with_other_settings(settings):
    _lockstep([(4, 24), (4, 24), (24, 4), (10,)], steps=10, **{**PHASES, **settings})


GROWTH = dict(lr_growth=1.0, lr_growth_max=3.0)  # the presets' rate; a bound that some tensors reach


def _assert_growth_moved(eager, params, to_the_bound=True):
    """Factors climbed (so the comparison covered the growth), and where ``to_the_bound`` some
    reached lr_growth_max (so it covered the clamp too)."""
    factors = [float(eager.state[p]["lr_growth"]) for p in params]
    assert any(1.0 < f < GROWTH["lr_growth_max"] for f in factors), factors
    assert (GROWTH["lr_growth_max"] in factors) == to_the_bound, factors


@pytest.mark.parametrize("case", ["lora", "full", "split", "compact", "growth-steps", "non-finite"])
def test_lr_growth_matches_eager(monkeypatch, case):
    """The opt-in per-tensor growth factor (the lora and high_performance presets set it) inside
    the kernels: grown from the sign agreement of gradient and momentum in warm-up (t = 2 .. 7),
    applied to every later step, kept by a skipped tensor (tensor 1 at step 3 in "non-finite"),
    compared with the eager step's after every step."""
    shapes = [(4, 24), (4, 24), (24, 4), (300, 3), (10,), (10,), (2100,)]
    settings = dict(PHASES, **GROWTH)
    if case == "full":
        settings["full_finetune"] = True
    elif case == "split":  # every matrix above 50 elements in blocks of rows: the factor grows in launch 2
        monkeypatch.setattr(kernels, "_SPLIT_NUMEL", 50)
        shapes = [(64, 24), (64, 24), (300, 3), (4, 300), (10,)]
    elif case == "compact":
        settings["state_precision"] = "bf16"
        shapes = [(4, 24), (4, 24), (24, 8), (10,), (10,)]
    elif case == "growth-steps":
        settings["lr_growth_steps"] = 4  # grows at t = 2 .. 4, then only applied
    split_before = kernels.launches.get("split_weights", 0)
    eager, fused, eager_params, _ = _lockstep(shapes, steps=10, drift=0.7, resync=case == "compact",
                                              nan_at=1 if case == "non-finite" else None, **settings)
    _assert_growth_moved(eager, eager_params, to_the_bound=case != "growth-steps")
    if case == "split":
        assert kernels.launches["split_weights"] - split_before == 9 * 3


def test_lr_growth_steps_stops_the_factor_in_the_kernels():
    """After lr_growth_steps the factor is only applied: the kernel must not keep growing it."""
    _, fused, _, fused_params = _lockstep([(4, 24), (4, 24), (10,)], steps=4, drift=0.7,
                                          **dict(PHASES, **GROWTH, lr_growth_steps=3))
    after_growth = [fused.state[p]["lr_growth"].clone() for p in fused_params]
    generator = torch.Generator().manual_seed(5)
    for _ in range(2):  # t = 5, 6: still warm-up, past the factor's steps
        _grads([fused_params], generator, drift=0.7)
        fused.step()
    assert all(torch.equal(fused.state[p]["lr_growth"], before) for p, before in zip(fused_params, after_growth))
    assert max(float(f) for f in after_growth) > 1.2


@pytest.mark.parametrize("preset", ["lora", "high_performance", "full"])
def test_every_preset_is_stepped_by_the_kernels(preset):
    """A user who adds fused=True to a preset gets kernels, not a silent eager step: the presets'
    settings as kohya passes them (a 16-step run, LoRA alpha 1 at rank 8), stepped by the kernels
    through warm-up and the decay, with the eager step's values and nothing said about an eager
    step."""
    from library.optimizer_factory import parse_optimizer_args, with_run_length
    from library.presets import load_preset
    config = load_preset(preset)
    settings = with_run_length(config["optimizer_type"], parse_optimizer_args(config["optimizer_args"]), 16)
    if "lora_scale_power" in settings:
        settings["lora_scale"] = 1 / 8  # kohya's default alpha 1 at rank 8, as the hook passes it
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*eager step")
        _lockstep(LORA_SHAPES if preset != "full" else FULL_SHAPES, steps=12, drift=0.7,
                  resync=settings.get("state_precision") == "bf16", lr=config["learning_rate"], **settings)


def test_a_non_finite_gradient_skips_that_tensor_in_both_paths():
    eager, fused, eager_params, fused_params = _lockstep([(4, 24), (4, 24), (10,)], steps=4, nan_at=1, **PHASES)
    assert eager.state[eager_params[1]]["step"] == 4


def test_bf16_weights_round_stochastically_like_eager():
    """Rounding noise differs between the paths (each draws its own), so each step starts both from
    the same state and weights, and the fused bf16 weights must land within one bf16 step of the
    eager ones (both are one of the two bf16 neighbours of nearly the same float32 value)."""
    eager_params, fused_params = _params(LORA_SHAPES, torch.bfloat16), _params(LORA_SHAPES, torch.bfloat16)
    eager = Automagic_Sinkgd(eager_params, fused=False, **PHASES)
    fused = Automagic_Sinkgd(fused_params, fused=True, **PHASES)
    generator = torch.Generator().manual_seed(3)
    for step in range(1, 11):
        _grads([eager_params, fused_params], generator)
        before = [p.detach().clone() for p in eager_params]
        eager.step()
        fused.step()
        for p, q, w in zip(eager_params, fused_params, before):
            ulp = torch.maximum(p.float().abs(), w.float().abs()) * 2.0**-7  # bf16 keeps 8 bits
            assert ((q.float() - p.float()).abs() <= ulp * 1.01).all(), f"step {step}, {tuple(p.shape)}"
        _assert_states_close(eager, fused, eager_params, fused_params, rtol=1e-2)
        fused.load_state_dict(eager.state_dict())  # the next step starts from the same place
        with torch.no_grad():
            for p, q in zip(eager_params, fused_params):
                q.copy_(p)


def test_bf16_rounding_is_unbiased_and_seeded_by_tensor_and_step():
    """Updates of a fraction of a bf16 step still move the weights on average, as much as the eager
    path moves them; two replicas round bit for bit alike."""
    shape = (16, 256)
    settings = dict(lr=2e-4, min_lr=1e-4, max_lr=1e-3, lr_bump=0.0, warmup_steps=100, weight_decay=0.0,
                    d_coef=1.0, vradam=False, allora=False)
    runs = {}
    for name, fused in (("eager", False), ("fused", True), ("replica", True)):
        p = torch.nn.Parameter(torch.ones(shape, dtype=torch.bfloat16, device=DEVICE))
        optimizer = Automagic_Sinkgd([p], fused=fused, **settings)
        for _ in range(6):
            p.grad = torch.ones(shape, dtype=torch.bfloat16, device=DEVICE)  # a steady push down
            optimizer.step()
        runs[name] = p.detach().float()
    # 5 moving steps of 2e-4 each (SinkGD makes |U| = 1): 1e-3, an eighth of bf16's step at 1.0.
    for name in ("eager", "fused"):
        moved = 1.0 - runs[name].mean().item()
        assert 0.7e-3 < moved < 1.3e-3, f"{name} moved {moved:.2e}"
    assert torch.equal(runs["fused"], runs["replica"])


def test_step_param_uses_the_kernel_and_leaves_grad_alone():
    """kohya's --fused_backward_pass steps one tensor at a time: the kernel then works on views of
    the parameter and its .grad, and must not use the caller's gradient as scratch."""
    shapes = [(4, 24), (24, 4), (10,)]
    eager_params, fused_params = _params(shapes), _params(shapes)
    settings = dict(PHASES, weight_decay=0.0)
    eager = Automagic_Sinkgd(eager_params, fused=False, **settings)
    fused = Automagic_Sinkgd(fused_params, fused=True, **settings)
    generator = torch.Generator().manual_seed(4)
    launches_before = kernels.launches.get("bucket_step", 0)
    for _ in range(10):
        _grads([eager_params, fused_params], generator)
        grads_before = [q.grad.clone() for q in fused_params]
        for p, q in zip(eager_params, fused_params):
            eager.step_param(p, eager.param_groups[0])
            fused.step_param(q, fused.param_groups[0])
        for q, g in zip(fused_params, grads_before):
            assert torch.equal(q.grad, g)
    assert kernels.launches["bucket_step"] - launches_before == 9 * len(shapes)  # t=1 is eager
    for p, q in zip(eager_params, fused_params):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


def test_one_launch_per_bucket_per_step():
    """Launches follow the distinct (shape, phase) buckets, not the tensors."""
    shapes = [(4, 24)] * 6 + [(24, 4)] * 5 + [(10,)] * 7
    params = _params(shapes)
    optimizer = Automagic_Sinkgd(params, fused=True, **PHASES)
    generator = torch.Generator().manual_seed(5)
    for _ in range(2):
        _grads([params], generator)
        optimizer.step()
    before = kernels.launches["bucket_step"]
    _grads([params], generator)
    optimizer.step()
    assert kernels.launches["bucket_step"] - before == 3


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_few_programs_loop_over_a_whole_bucket(monkeypatch, precision):
    """A bucket is one launch however many tensors it holds: with the U buffer capped at two
    tensors' worth, two programs step five (4, 24) matrices, three (24, 8) and three vectors,
    each program reusing its buffer slot, and the result is the eager step's."""
    monkeypatch.setattr(kernels, "_SCRATCH_NUMEL", 2 * 96)
    shapes = [(4, 24)] * 5 + [(24, 8)] * 3 + [(10,)] * 3
    before = kernels.launches.get("bucket_step", 0)
    _lockstep(shapes, steps=10, resync=precision != "fp32", state_precision=precision, **PHASES)
    assert kernels.launches["bucket_step"] - before == 9 * 3  # one launch per bucket per step


def test_whole_bucket_stacks_replace_the_first_steps_chunks(monkeypatch):
    """The eager first step stacks a bucket in chunks, the fused steps after it as a whole: the
    chunks' stacks must be let go, not kept as a second copy of the state."""
    monkeypatch.setattr(core, "_MIN_CHUNK_NUMEL", 200)  # chunks of two (4, 24) tensors
    params = _params([(4, 24)] * 6)
    optimizer = Automagic_Sinkgd(params, fused=True, **PHASES)
    generator = torch.Generator().manual_seed(12)
    for _ in range(3):
        _grads([params], generator)
        optimizer.step()
    in_use = {optimizer.state[p][key].untyped_storage().data_ptr() for p in params for key in optimizer.state[p]
              if torch.is_tensor(optimizer.state[p][key])}
    cached = {stacked.untyped_storage().data_ptr() for cache in optimizer._stack_caches.values()
              for key, (_, stacked) in cache.items() if key in optimizer.state[params[0]]}  # not address tables
    assert len(cached) >= 2  # momentum, mask, ... of the one whole-bucket stack
    assert cached <= in_use, "stacks the state no longer uses are still cached"


@pytest.mark.parametrize("settings", [
    dict(decay_floor=0.0, decay_horizon="run", total_steps=12),  # the lora preset's schedule
    dict(foreach=False),                                          # one tensor at a time, still fused
], ids=["decay-to-zero-over-the-run", "foreach-false"])
def test_fused_step_with_other_schedules_and_per_tensor(settings):
    before = kernels.launches.get("bucket_step", 0)
    _lockstep([(4, 24), (4, 24), (10,)], steps=10, **{**PHASES, **settings})
    per_step = 3 if settings.get("foreach") is False else 2
    assert kernels.launches["bucket_step"] - before == 9 * per_step  # t = 2 .. 10, post-warm-up too


# ------------------------------------------------------------------ where the eager step runs instead


def _assert_takes_the_eager_step(shapes, dtype=torch.float32, seed=6, **settings):
    """fused=True makes no kernel launch and steps bit for bit as fused=False does."""
    runs = []
    for fused in (False, True):
        params = _params(shapes, dtype)
        optimizer = Automagic_Sinkgd(params, fused=fused, **{**PHASES, **settings})
        generator = torch.Generator().manual_seed(seed)
        before = kernels.launches.get("bucket_step", 0)
        for _ in range(4):
            _grads([params], generator)
            optimizer.step()
        assert kernels.launches.get("bucket_step", 0) == before
        runs.append(params)
    for p, q in zip(*runs):
        assert torch.equal(p, q)


def test_a_tensor_lr_takes_the_eager_step():
    """A kernel argument is a host value: the eager step reads a tensor lr where it lives."""
    _assert_takes_the_eager_step([(4, 24), (4, 24), (10,)], lr=torch.tensor(PHASES["lr"]))


def test_fp16_weights_take_the_eager_step():
    _assert_takes_the_eager_step([(4, 24), (10,)], torch.float16, seed=6)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_large_tensors_split_into_row_blocks_match_eager(monkeypatch, mode):
    """Full fine-tune matrices are split over programs (blocks of rows, 2 + sinkgd_iters launches,
    partial column sums added up by the next launch): here every tensor above 50 elements is,
    (64, 24) in four blocks of rows, (300, 3) in five, (4, 300) in one; a vector above the limit
    takes the eager step; (256, 24) in eight blocks of two tile rows each (a block's partial column
    sums added over its tile rows)."""
    monkeypatch.setattr(kernels, "_SPLIT_NUMEL", 50)
    split_before = kernels.launches.get("split_weights", 0)
    full = mode == "full"
    _lockstep([(64, 24), (64, 24), (300, 3), (4, 300), (256, 24), (10,), (60,)], steps=10, full_finetune=full,
              **PHASES)
    assert kernels.launches["split_weights"] - split_before == 9 * 4  # four split buckets, t = 2..10


def test_split_bf16_weights_round_stochastically(monkeypatch):
    """The split kernels round bf16 weights without bias, as the one-program kernel does."""
    monkeypatch.setattr(kernels, "_SPLIT_NUMEL", 1000)  # (64, 256): four blocks of 16 rows
    shape = (64, 256)
    settings = dict(lr=2e-4, min_lr=1e-4, max_lr=1e-3, lr_bump=0.0, warmup_steps=100, weight_decay=0.0,
                    d_coef=1.0, vradam=False, allora=False)
    p = torch.nn.Parameter(torch.ones(shape, dtype=torch.bfloat16, device=DEVICE))
    optimizer = Automagic_Sinkgd([p], fused=True, **settings)
    before = kernels.launches.get("split_weights", 0)
    for _ in range(4):
        p.grad = torch.ones(shape, dtype=torch.bfloat16, device=DEVICE)
        optimizer.step()
    assert kernels.launches["split_weights"] - before == 3
    moved = 1.0 - p.detach().float().mean().item()
    assert 0.45e-3 < moved < 0.75e-3, f"moved {moved:.2e}"  # 3 steps of 2e-4, each 1/20 of bf16's step


# A compact state's kernels pack signs row by row: matrices with 8k columns (and any vector) take
# them in warm-up; (24, 4) takes the eager step until warm-up ends (signs freed), then the kernel.
COMPACT_LORA_SHAPES = [(4, 24), (4, 24), (24, 8), (8, 320), (300, 8), (10,), (10,), (2100,), (24, 4)]
COMPACT_FULL_SHAPES = [(16, 24), (16, 24), (8, 9, 2, 4), (70, 8), (33,), (1,)]


@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16], ids=["fp32-weights", "bf16-weights"])
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_compact_state_fused_matches_eager_in_every_phase(mode, weights):
    """state_precision="bf16" (bf16 momentum, 16-bit mask codes, packed signs) read and written
    inside the kernels: the same momentum noise, codes and bits as the eager step."""
    full = mode == "full"
    shapes = COMPACT_FULL_SHAPES if full else COMPACT_LORA_SHAPES
    before = kernels.launches.get("bucket_step", 0)
    _lockstep(shapes, steps=10, dtype=weights, resync=True, full_finetune=full, state_precision="bf16",
              **dict(PHASES, d_coef=3.0))
    # every bucket of every step t >= 2 fused, but (24, 4) during warm-up (t = 2 .. 7)
    buckets = len(set(shapes))
    assert kernels.launches["bucket_step"] - before == 9 * buckets - (0 if full else 6)


def test_compact_state_split_kernels_match_eager(monkeypatch):
    monkeypatch.setattr(kernels, "_SPLIT_NUMEL", 50)
    split_before = kernels.launches.get("split_weights", 0)
    _lockstep([(64, 24), (64, 24), (300, 8), (8, 320), (10,), (60,)], steps=10, resync=True,
              state_precision="bf16", **PHASES)
    assert kernels.launches["split_weights"] - split_before == 9 * 3


def test_bf16_weights_round_from_the_eager_noise():
    """Both paths read the weights' rounding noise from the same table at the same per-tensor
    offsets: from the same state, the fused bf16 weights are the eager ones bit for bit, but where
    float32 arithmetic put the two values on either side of a rounding boundary."""
    eager_params, fused_params = _params(LORA_SHAPES, torch.bfloat16), _params(LORA_SHAPES, torch.bfloat16)
    eager = Automagic_Sinkgd(eager_params, fused=False, **PHASES)
    fused = Automagic_Sinkgd(fused_params, fused=True, **PHASES)
    generator = torch.Generator().manual_seed(11)
    same = total = 0
    for _ in range(6):
        _grads([eager_params, fused_params], generator)
        eager.step()
        fused.step()
        for p, q in zip(eager_params, fused_params):
            same += (p == q).sum().item()
            total += p.numel()
        fused.load_state_dict(eager.state_dict())
        with torch.no_grad():
            for p, q in zip(eager_params, fused_params):
                q.copy_(p)
    assert same / total >= 0.999, f"{total - same} of {total} weights rounded differently"


def test_state_layouts_the_kernel_refuses():
    p = torch.zeros(4, 24, device=DEVICE)
    state = dict(exp_avg=torch.zeros(4, 24, device=DEVICE), lr_mask=torch.zeros(4, 24, device=DEVICE),
                 polarity=torch.zeros(4, 24, dtype=torch.bool, device=DEVICE))
    assert kernels.unsupported_reason([p], [state]) is None
    # a half-converted state: bf16 momentum beside a float32 mask
    assert "layouts" in kernels.unsupported_reason([p], [dict(state, exp_avg=state["exp_avg"].bfloat16())])
    compact = dict(exp_avg=torch.zeros(4, 24, dtype=torch.bfloat16, device=DEVICE),
                   lr_mask=torch.zeros(4, 24, dtype=torch.uint16, device=DEVICE),
                   polarity=torch.zeros(12, dtype=torch.uint8, device=DEVICE), lr_mask_codec=(1e-4, 1e-6))
    assert kernels.unsupported_reason([p], [compact]) is None
    q = torch.zeros(24, 4, device=DEVICE)  # rows of 4 signs: half a byte
    assert "bytes" in kernels.unsupported_reason([q], [dict(compact, polarity=torch.zeros(12, dtype=torch.uint8))])
    assert kernels.unsupported_reason([q], [{k: v for k, v in compact.items() if k != "polarity"}]) is None
    phase = core._Phase(3, 8, False, True)
    assert kernels.step_bucket([q], [q], [dict(compact, polarity=torch.zeros(12, dtype=torch.uint8))], {},
                               phase, True, None, [0], [0], {}) is False


def test_missing_triton_warns_once_and_steps_eagerly(monkeypatch):
    monkeypatch.setattr(core, "_KERNELS", [])
    monkeypatch.setitem(sys.modules, "library.automagic_sinkgd_kernels", None)  # import raises ImportError
    runs = []
    for fused in (False, True):
        params = _params([(4, 24), (10,)])
        optimizer = Automagic_Sinkgd(params, fused=fused, **PHASES)
        generator = torch.Generator().manual_seed(7)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(4):
                _grads([params], generator)
                optimizer.step()
        messages = [str(w.message) for w in caught if "fused kernels cannot be imported" in str(w.message)]
        assert len(messages) == (1 if fused else 0)
        runs.append(params)
    for p, q in zip(*runs):
        assert torch.equal(p, q)


@pytest.mark.parametrize("value", ["yes", 1, 0.0])
def test_bad_fused_setting_names_it(value):
    with pytest.raises(ValueError, match=r"fused=.*None, True or False"):
        Automagic_Sinkgd([torch.nn.Parameter(torch.zeros(2))], lr=1e-4, fused=value)
