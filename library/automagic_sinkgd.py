"""Automagic_Sinkgd: a per-element adaptive-lr optimizer for Stable Diffusion LoRA and fine-tuning.

One file, torch and the standard library only, so it can be copied into any project (for
kohya sd-scripts: into its ``library/`` folder, then
``--optimizer_type library.automagic_sinkgd.Automagic_Sinkgd``).

Layout, in the spirit of ``torch/optim/adamw.py``:
  * one small pure function per technique (each cites its paper), all working on a stack of
    same-shape tensors with a leading batch dimension B, so the per-tensor path is just B == 1;
  * ``_bucket_math`` composes them for one bucket of same-shape tensors (steps 2-9), and
    ``_step_bucket`` gathers the bucket's stacks around it (state lives in one buffer per
    bucket, so the stacks cost nothing after the first step);
  * the ``Automagic_Sinkgd`` class: validation, state, buckets, resume, logging helpers.

No host synchronisation happens in ``step()``: phases are decided from per-tensor step counters
kept as Python ints in the state (saved with it), and every data-dependent choice is tensor
arithmetic on the device.

The step is bound by memory traffic, so kernels are chosen for bytes and speed: no float-to-bool
compares or broadcast ``where`` on full tensors (several times slower on CPU than float, int8 or
byte arithmetic), in-place updates, and buffers whose values are spent reused for later ones.
"""

from __future__ import annotations

import contextlib
import math
import operator
from collections import defaultdict
from typing import Any, Callable, Iterable, Optional, Union

import torch
from torch import Tensor

__all__ = [
    "Automagic_Sinkgd",
    "grams_direction",
    "orthograd",
    "sinkgd_scalings",
    "sinkgd_normalize",
    "prodigy_signal",
    "prodigy_bumps",
    "sign_flips_",
    "automagic_mask_update_",
    "vradam_brake",
    "finite_flags",
    "allora_row_scaling",
    "post_warmup_decay",
    "post_warmup_decay_rate",
    "relative_lr_bump",
    "gradient_scaled_decay",
    "stochastic_round_",
    "NOISE_PERIOD",
    "NOISE_PERIOD_STRIDE",
    "noise_index",
    "rounding_noise_table",
    "rounding_noise_offset",
    "add_rounding_noise_",
    "pack_bits_",
    "unpack_bits",
    "lr_mask_codec",
    "encode_lr_mask_",
    "decode_lr_mask",
]

STATE_PRECISIONS = ("fp32", "bf16")

# Elements per chunk when stacking same-shape tensors: the largest tensor's size, so a step's
# temporaries stay a few times the largest tensor however many tensors there are, but at least
# enough to amortise kernel launches over many small LoRA matrices, and at most 4 MB of float32:
# beyond that a launch costs nothing next to the work, while bigger temporaries are not reused
# by the C allocator (glibc maps allocations above 32 MB fresh, paying a page fault per 4 KB).
_MIN_CHUNK_NUMEL = 1 << 16
_MAX_CHUNK_NUMEL = 1 << 20
# On a GPU a launch costs microseconds whatever its size and the caching allocator reuses blocks of
# any size: a bucket's chunks hold up to 16M elements (64 MB of float32 per temporary), so a step
# is a few hundred launches rather than ~110 per 1M-element chunk.
_GPU_CHUNK_NUMEL = 1 << 24


def _launch_bound(device: torch.device) -> bool:
    """Whether the device runs each op as a kernel launch (a GPU): chunks and rounding-noise
    gathers are then sized to cut launches, not for the CPU's allocator and caches, vectors of
    every length share one padded stack, and the finite test is made once per group."""
    return device.type != "cpu"


# ----------------------------------------------------------------------------------------------
# Pure transforms. Matrices arrive as (B, rows, cols), vectors as (B, n); B tensors at once.
# ----------------------------------------------------------------------------------------------


def _batched_dot(a: Tensor, b: Tensor) -> Tensor:
    """<a_i, b_i> for each of the B stacked tensors, as a (B,) tensor."""
    if a.shape[0] == 1:  # BLAS dot: one read of each, no temporary (a lone tensor can be large)
        return torch.dot(a.reshape(-1), b.reshape(-1)).view(1)
    # A (B,1,N) @ (B,N,1) bmm is ~20x slower on CPU than vecdot's multiply-and-sum.
    return torch.linalg.vecdot(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1))


def _batched_sq_norm(a: Tensor) -> Tensor:
    """||a_i||^2 for each of the B stacked tensors, as a (B,) tensor, in one read."""
    return torch.linalg.vector_norm(a.reshape(a.shape[0], -1), dim=1).square()


def _store(op, out: Tensor, *args, **kwargs) -> Tensor:
    """``out.copy_(op(*args, **kwargs))`` as one kernel where ``out=`` can take the result (its
    dtype, a dense tensor): a state view written in place, not a temporary and a copy."""
    if out.is_contiguous() and out.dtype == torch.result_type(args[0], args[-1]):
        return op(*args, **kwargs, out=out)
    return out.copy_(op(*args, **kwargs))


def _row_means(stacked: Tensor, mean_weights: Optional[Tensor] = None, out: Optional[Tensor] = None) -> Tensor:
    """Each stacked tensor's mean, (B,), written into ``out`` where given. For a zero-padded stack
    of vectors, ``mean_weights`` (B, L) holds 1 / length over each tensor's own elements and 0 over
    its padding: the mean is then one batched dot product, as one kernel as a plain mean."""
    batch = stacked.shape[0]
    if mean_weights is None:
        return _store(torch.mean, out, stacked.reshape(batch, -1), dim=1) if out is not None else \
            stacked.reshape(batch, -1).mean(dim=1)
    rows, weights = stacked.reshape(batch, 1, -1), mean_weights.unsqueeze(-1)
    with _ieee_float32_matmuls():  # a mean, not a TF32 estimate of one
        if out is not None and out.is_contiguous() and out.dtype == stacked.dtype:
            return torch.bmm(rows, weights, out=out.view(batch, 1, 1)).view(batch)
        means = torch.bmm(rows, weights).view(batch)
    return out.copy_(means) if out is not None else means


def _padded_mean_weights(tensors: list[Tensor], length: int, dtype: torch.dtype) -> Tensor:
    """``_row_means``' weights for ``tensors`` zero-padded to ``length``: (B, length) in ``dtype``."""
    lengths = offsets_tensor([float(t.numel()) for t in tensors], dtype, tensors[0].device)
    columns = torch.arange(length, device=tensors[0].device)
    return (columns < lengths.unsqueeze(1)).to(dtype) / lengths.unsqueeze(1)


def _per_tensor(values: Tensor, like: Tensor) -> Tensor:
    """Reshape a (B,) tensor so it broadcasts against a stack shaped like ``like``."""
    return values.view((-1,) + (1,) * (like.ndim - 1))


def grams_direction(grad: Tensor, exp_avg: Tensor, is_matrix: bool) -> Tensor:
    """Grams (Cao et al. 2024, arXiv 2412.17107): magnitude from the momentum, sign from the gradient.

    Matrices take the sign of g + m, vectors the sign of g.
    """
    if is_matrix:
        # copysign(m, g + m) equals |m| * sign(g + m) except on an exact tie g + m == 0 with
        # m != 0, which floating-point gradients do not produce; it is one kernel instead of three.
        direction = torch.add(grad, exp_avg)
        return torch.copysign(exp_avg, direction, out=direction)
    # Vectors keep the exact rule: a bias whose gradient is exactly 0 (a dead unit) must not move.
    return exp_avg.abs() * grad.sign()


def orthograd(update: Tensor, weight: Tensor, keep_norm: bool = True) -> Tensor:
    """OrthoGrad (Prieto et al. 2025, "Grokking at the Edge of Numerical Stability", arXiv 2501.04697).

    Removes from each update its component along the weights (in place), then restores the
    update's norm unless ``keep_norm`` is False (a caller that rescales each tensor anyway).
    """
    weight = weight.to(update.dtype)
    tiny = torch.finfo(update.dtype).tiny
    norm_before = _batched_sq_norm(update).sqrt() if keep_norm else None
    projection = _batched_dot(update, weight) / _batched_sq_norm(weight).clamp_min(tiny)
    orthogonal = update.addcmul_(weight, _per_tensor(projection, update), value=-1.0)
    if not keep_norm:
        return orthogonal
    norm_after = _batched_sq_norm(orthogonal).sqrt()
    rescale = torch.where(norm_after > 0, norm_before / norm_after.clamp_min(tiny), 0.0)
    return orthogonal.mul_(_per_tensor(rescale, orthogonal))


def sinkgd_scalings(update: Tensor, iters: int, scratch: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """SinkGD (Scetbon et al. 2025, "Gradient Multi-Normalization", arXiv 2502.06742).

    Alternately rescaling rows to L2 norm sqrt(cols) and columns to sqrt(rows) ``iters`` times
    equals diag(r) @ U @ diag(c) for two vectors found by Sinkhorn's iteration on U**2. Working on
    the squares turns 4 * iters passes that rewrite U into 2 * iters batched mat-vecs that only
    read U**2, and lets the caller fold r and c into the final update. Returns r (B, rows, 1) and
    c (B, 1, cols). An all-zero row or column gets a huge but finite scale (its norm is floored
    at the dtype's tiny), so it stays exactly zero in the product instead of turning into 0/0.
    ``scratch``, a tensor shaped like ``update`` whose values are no longer needed, holds U**2.
    """
    batch, rows, cols = update.shape
    if iters <= 0:
        ones = update.new_ones(())
        return ones.expand(batch, rows, 1), ones.expand(batch, 1, cols)
    tiny = torch.finfo(update.dtype).tiny
    squares = torch.square(update, out=scratch.view_as(update)) if scratch is not None else update.square()
    # Iterate with unit target norms (1 / norm**2, two in-place kernels per half-step); every
    # half-step then differs from the exact one by a scalar, and the last column pass pins it:
    # columns come out with norm 1 where SinkGD wants sqrt(rows).
    # Both scalings are kept as row vectors (B, 1, n): the row pass as c @ U**2^T runs ~4x faster
    # on CPU than U**2 @ c for LoRA's wide (16, n) matrices, and never slower.
    row_sq = squares.sum(dim=2).unsqueeze(1).clamp_min_(tiny).reciprocal_()  # c = 1 on the first pass
    with _ieee_float32_matmuls():
        col_sq = torch.bmm(row_sq, squares).clamp_min_(tiny).reciprocal_()  # (B, 1, cols)
        for _ in range(iters - 1):
            row_sq = torch.bmm(col_sq, squares.transpose(1, 2)).clamp_min_(tiny).reciprocal_()  # (B, 1, rows)
            col_sq = torch.bmm(row_sq, squares).clamp_min_(tiny).reciprocal_()
    return row_sq.sqrt_().mul_(math.sqrt(rows)).transpose(1, 2), col_sq.sqrt_()


@contextlib.contextmanager
def _ieee_float32_matmuls():
    """SinkGD's mat-vecs in true float32 whatever the trainer's TF32 setting: TF32's 10-bit
    mantissa would leave the scalings ~1e-3 off (and the eager step unlike the fused one). Global
    for the duration (cuBLAS reads the flag per call); left alone under torch.compile, where
    changing it would break the graph."""
    matmul = torch.backends.cuda.matmul
    if torch.compiler.is_compiling() or not matmul.allow_tf32:
        yield
        return
    try:
        medium = torch.get_float32_matmul_precision() == "medium"
    except RuntimeError:  # the trainer mixed torch's two TF32 APIs itself: its settings stay as they are
        medium = False
    matmul.allow_tf32 = False  # the legacy flag: it keeps cuBLAS's legacy and per-backend settings alike
    try:
        yield
    finally:
        # the flag turns on "high"; a trainer's "medium" (TF32, and bf16 where a backend has it) is
        # set again, or torch.get_float32_matmul_precision() would raise on the mixed settings
        if medium:
            torch.set_float32_matmul_precision("medium")
        else:
            matmul.allow_tf32 = True


def sinkgd_normalize(update: Tensor, iters: int) -> Tensor:
    """SinkGD (arXiv 2502.06742) applied: diag(r) @ U @ diag(c) for a (B, rows, cols) stack."""
    row_scale, col_scale = sinkgd_scalings(update, iters)
    return update * row_scale * col_scale


def prodigy_signal(grad: Tensor, weight: Tensor, initial_weight: Tensor) -> Tensor:
    """Prodigy (Mishchenko & Defazio 2023, arXiv 2306.06101): c = -<g, x - x0>, one per tensor.

    Positive when the gradient still points back past the starting weights, i.e. the distance
    travelled is an underestimate and the learning rate may grow faster.
    """
    # bf16 x0 against float32 weights: the subtraction promotes, with no converted copy of x0
    return _batched_dot(grad, torch.sub(initial_weight, weight).to(grad.dtype))


def prodigy_bumps(lr_bump: float, d_coef: float, signal: Optional[Tensor], batch: int,
                  like: Tensor, keep: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Prodigy-style bump sizes (arXiv 2306.06101): the signal picks which way moves d_coef faster.

    Returns (up, down), each (B,) in the dtype and device of ``like``; times ``keep`` (B,), 1.0 or
    0.0 per tensor, where given (a skipped tensor's mask does not move).
    """
    if keep is not None:  # exactly lr_bump or 0, as a fill of lr_bump times keep would be
        base = keep.to(like.dtype) * lr_bump
    else:
        base = torch.full((batch,), lr_bump, dtype=like.dtype, device=like.device)
    if signal is None or d_coef == 1:
        return base, base
    boosted = base * d_coef
    return torch.where(signal > 0, boosted, base), torch.where(signal < 0, boosted, base)


def sign_flips_(grad: Tensor, polarity: Tensor, keep: Tensor) -> Tensor:
    """Which elements' gradient changed sign since last step, as 1.0 / 0.0, and the new signs
    written into ``polarity`` (bool, "g > 0") for the stacked tensors where ``keep`` (B,) is true.

    Float-to-bool kernels (``grad > 0``) and bool-to-float promotion are several times slower on
    CPU than plain float, int8 and byte arithmetic, so the comparison is done in those: sign(g)
    as int8, clamped at 0, is exactly 1 where g > 0 and 0 elsewhere, bytes that are valid bools.
    """
    signs = torch.sign(grad)
    positive = signs.to(torch.int8).clamp_(min=0).view(torch.uint8)
    old = polarity.view(torch.uint8)
    flips = positive.bitwise_xor_(old).bitwise_and_(_per_tensor(keep, positive).view(torch.uint8))
    old.bitwise_xor_(flips)  # a skipped tensor (keep false) has no flips, so keeps its signs
    return signs.copy_(flips)  # as 1.0 / 0.0, reusing the float buffer


def automagic_mask_update_(lr_mask: Tensor, flips: Tensor, up: Tensor, down: Tensor,
                           min_lr: float, max_lr: float) -> Tensor:
    """Automagic per-element learning rate (in place): raise an element's lr by ``up`` while its
    gradient keeps the sign it had last step (flips 0), lower it by ``down`` when the sign flips
    (flips 1), clamp to [min_lr, max_lr]. ``up``/``down`` are (B,) so each tensor moves by its own
    amount."""
    up, down = _per_tensor(up, lr_mask), _per_tensor(down, lr_mask)
    # mask + up - flips * (up + down): in place, three passes and no temporary.
    return lr_mask.add_(up).addcmul_(flips, up + down, value=-1.0).clamp_(min_lr, max_lr)


def rprop_mask_update_(lr_mask: Tensor, flips: Tensor, up: Tensor, down: Tensor,
                       min_lr: float, max_lr: float) -> Tensor:
    """Rprop's multiplicative step-size rule (Riedmiller & Braun 1993) on the mask (in place):
    multiply an element's lr by exp(up) while its gradient keeps its sign, by exp(-down) when the
    sign flips, clamp to [min_lr, max_lr]: the additive rule on log(lr), ``up`` and ``down`` in
    log units. A move is relative to the element's own lr, so the steps it takes to reach a rate
    grow with the log of the distance, not the distance: the same adaptation time at any LoRA
    alpha or weight scale. ``flips`` (1.0 / 0.0) is used up as scratch."""
    grow = _per_tensor(up.exp(), lr_mask)
    shrink = _per_tensor(down.neg().exp(), lr_mask)
    # factor = grow where the sign held, shrink where it flipped
    return lr_mask.mul_(flips.mul_(shrink - grow).add_(grow)).clamp_(min_lr, max_lr)


def momentum_agreement_growth_(lr_growth: Tensor, grad: Tensor, exp_avg: Tensor, growth_rate: float,
                               growth_max: float, keep: Tensor, mean_weights: Optional[Tensor] = None) -> Tensor:
    """Per-tensor lr factor, grown where the gradient still agrees with the momentum: a tensor-level
    hypergradient sign test (Baydin et al. 2018, arXiv 1703.04782). ``lr_growth`` (B,) is multiplied
    by exp(growth_rate x a), a = the mean of sign(g) x sign(m) over the tensor, in [-1, 1], and
    clamped to [1, growth_max]. Averaged over a tensor the per-element sign noise cancels (a is
    about 0 when the gradient is noise), so only a tensor whose gradient keeps pointing the way it
    has been moving climbs, geometrically: a rate 100x too small is found in tens of steps, where
    the additive mask needs hundreds. It only grows (never below 1, the mask's own rate): a greedy
    one-step signal is biased towards rates that are too small (Wu et al. 2018, arXiv 1803.02021),
    and lowering rates is the mask's sign-flip rule's job. ``keep`` (B,) 0.0 leaves a skipped
    tensor's factor as it was. Called with the momentum before this step's update."""
    agreement = _row_means(torch.mul(grad, exp_avg).sign_(), mean_weights)
    return lr_growth.mul_(agreement.mul_(keep).mul_(growth_rate).exp_()).clamp_(1.0, growth_max)


def vradam_brake(exp_avg: Tensor, keep: Optional[Tensor] = None) -> Tensor:
    """VRAdam (arXiv 2505.13196): velocity-regularised step, 1 / (1 + min(3 * ||m||^2, 10)) per tensor,
    times ``keep`` (B,), 1.0 or 0.0, where given: the same values as multiplying afterwards."""
    slowdown = 1.0 + (3.0 * _batched_sq_norm(exp_avg)).clamp_max(10.0)
    # reciprocal, not 1.0 / x: the same values in one kernel instead of two
    return torch.reciprocal(slowdown) if keep is None else torch.div(keep, slowdown)


def allora_row_scaling(weight: Tensor, eta: float) -> Tensor:
    """ALLoRA (Huang et al. 2024, arXiv 2410.09692): per-row factor 1 / sqrt(||w_row|| + 1/eta^2).

    Rows that are still small (a zero-initialised lora_up) get the full factor eta and leave zero
    quickly; large rows are damped. Returns (B, rows) in float32 or wider.
    """
    dtype = torch.promote_types(weight.dtype, torch.float32)
    row_norms = torch.linalg.vector_norm(weight.to(dtype), dim=-1)
    return (row_norms + 1.0 / eta**2).rsqrt()


def post_warmup_decay(lr_decay: Tensor, lr_ratio: Union[float, Tensor], floor: float = 0.1) -> Tensor:
    """Automagic's post-warm-up schedule: the linear decay, capped by an outside LR scheduler's
    ratio group_lr / lr_max (so a scheduler can only lower it) and floored (0.1 in the document;
    ``decay_floor`` opt-in: 0 decays to zero, 1 keeps the rate)."""
    if isinstance(lr_ratio, Tensor):
        return lr_decay.clamp_max(lr_ratio).clamp_min(floor)
    # max(min(x, ratio), floor) is clamp(x, floor, ratio) for floor <= ratio and floor otherwise: one kernel
    return lr_decay.clamp(floor, max(lr_ratio, floor))


def post_warmup_decay_rate(avg_lr: Tensor, avg_lr_max: Tensor, warmup_steps: int,
                           horizon: str = "warmup", total_steps: Optional[int] = None) -> Tensor:
    """Per-step slope of the linear post-warm-up decay, slower if the mask ended below its peak.

    ``horizon="warmup"`` (the document): it reaches 0 after another ``warmup_steps``.
    ``horizon="run"`` (opt-in): it reaches 0 at ``total_steps``, spreading the decay over the
    rest of the run, a linear decay to zero as in "Straight to Zero" (Bergsma et al. 2025,
    arXiv 2502.15938) instead of a long tail at the floor. The decay steps are the run's steps
    from ``warmup_steps`` to ``total_steps``, both included (each step decays before it updates),
    so only the last one is at 0; one fewer reached 0 a step early and left a 3-step run with a
    two-step warm-up nothing to train with.
    """
    steps = warmup_steps if horizon == "warmup" else max(1, total_steps - warmup_steps + 1)
    return avg_lr / avg_lr_max / steps


def annealed_log_bump(log_bump: float, decay_after: Optional[int], t: int, lattice_step: float) -> float:
    """The multiplicative mask's move at step t: full size for the first ``decay_after`` steps,
    then shrinking as 1 / sqrt(t), the step-size schedule of sign-based stochastic methods
    (signSGD, Bernstein et al. 2018, arXiv 1802.04434). The moves' sum still grows without bound
    (a mask can travel any distance), their variance only as log(t): a long warm-up no longer
    lets a per-element lr random-walk away on sign noise. Rounded to whole steps of the 16-bit
    mask's log lattice (``lattice_step``), so a compact state keeps every move exactly."""
    if not decay_after or t <= decay_after:
        return log_bump
    move = log_bump * math.sqrt(decay_after / t)
    return max(1, round(move / lattice_step)) * lattice_step if lattice_step > 0 else move


def warmup_length(warmup_steps: Union[int, float], total_steps: Optional[int],
                  max_steps: Optional[int] = None) -> int:
    """The warm-up in steps: an integer count (the document), or a share in (0, 1) of the run's
    total_steps (opt-in, as kohya reads its own --lr_warmup_steps), so that the phase split
    follows the run length: a 300-step run leaves warm-up, a 5000-step run adapts longer.
    ``max_steps`` (opt-in) caps it: a share of a short run, a fixed length on long ones."""
    length = max(1, round(warmup_steps * total_steps)) if isinstance(warmup_steps, float) else warmup_steps
    return length if max_steps is None else min(length, max_steps)


def relative_lr_bump(lr_bump: float, relative_bump: Optional[float], base_lr: float) -> float:
    """One mask move: the absolute ``lr_bump`` (the document), or ``relative_bump`` x the group's
    base lr (opt-in), so the mask's random walk keeps the same size relative to its starting
    point at any learning-rate scale (Automagic's additive bumps ratchet up when large against lr)."""
    return lr_bump if relative_bump is None else relative_bump * base_lr


def lora_scale_lr_factor(lora_scale: Optional[float], power: float, power_above: Optional[float] = None) -> float:
    """What a LoRA group's learning rates (lr, the mask bounds, an absolute lr_bump) are multiplied
    by so that one setting fits any kohya ``network_alpha / network_dim``: (1 / lora_scale) ** power,
    with ``power_above`` (default: ``power``) where alpha > rank. LoRA multiplies its product by
    lora_scale = alpha / rank, and under a normalised (Adam-like) step tuning alpha acts like
    tuning the lr (Hu et al., 2021, LoRA, sec. 4.1). Power 1 undoes the scale in full, 0 keeps the
    lrs as given; alpha = rank is the reference (factor 1) at any power."""
    if lora_scale is None:
        return 1.0
    exponent = power if lora_scale <= 1 or power_above is None else power_above
    return float(lora_scale) ** -exponent if exponent else 1.0


def gradient_scaled_decay(abs_grad_mean: Tensor, group_mean: Tensor, group_std: Tensor) -> Tensor:
    """Gradient-aware weight decay strength theta = 2 * sigmoid(4 z), z = the tensor's mean |g|
    standardised by the group's; 1 for a typical tensor, up to 2 for tensors with large gradients."""
    z = (abs_grad_mean - group_mean) / group_std.clamp_min(torch.finfo(group_std.dtype).tiny)
    return 2.0 * torch.sigmoid(4.0 * z)


def stochastic_round_(target: Tensor, value: Tensor, generator: Optional[torch.Generator] = None,
                      noise_offsets: Optional[list[int]] = None) -> Tensor:
    """Stochastic rounding (Gupta et al. 2015, arXiv 1502.02551) of float32 ``value`` into the
    bf16/fp16 ``target``: rounds up with probability equal to the remainder, so updates smaller
    than half an ulp still move the weights on average instead of being rounded away.

    For a bf16 ``target`` the caller may pass ``noise_offsets``, one per row of ``value`` viewed as
    (len(noise_offsets), -1), instead of ``generator``: the noise is then read from the rounding
    table (``add_rounding_noise_``) and ``value`` is clobbered.
    """
    if target.dtype == torch.bfloat16:
        # bf16 is the top half of fp32: add 16 uniform random bits below the kept ones, then truncate.
        if noise_offsets is None:
            bits = value.view(torch.int32) + torch.randint(0, 1 << 16, value.shape, dtype=torch.int32,
                                                           device=value.device, generator=generator)
        else:
            bits = add_rounding_noise_(value.view(torch.int32).view(len(noise_offsets), -1), noise_offsets)
        bits.bitwise_and_(-(1 << 16))
        return target.copy_(bits.view(torch.float32).view(target.shape))
    nearest = value.to(target.dtype)
    error = value - nearest.to(value.dtype)
    neighbour = torch.nextafter(nearest, torch.where(error > 0, math.inf, -math.inf).to(target.dtype))
    gap = (neighbour.to(value.dtype) - nearest.to(value.dtype)).abs()
    take_neighbour = torch.rand(value.shape, dtype=value.dtype, device=value.device,
                                generator=generator) * gap < error.abs()
    return target.copy_(torch.where(take_neighbour, neighbour, nearest))


# ----------------------------------------------------------------------------------------------
# Compact state (state_precision="bf16"): storage only. The step loads these to float32, runs the
# same math, and stores them back; nothing here changes what the step computes.
# ----------------------------------------------------------------------------------------------

# Bit tricks on 8 bytes at a time (one int64 word): a byte's bits spread to 8 bytes, and 8 bytes
# of 0/1 gathered into one, each one multiply and one mask instead of eight shifts.
_SPREAD_BYTE = 0x0101010101010101               # copies a byte into all 8 bytes of a word
_SELECT_BITS = 0x8040201008040201 - (1 << 64)   # keeps bit j in byte j (as a signed int64)
_GATHER_BITS = 0x0102040810204080               # moves byte j's low bit to bit 56 + j
_CODE_STEPS = 65535  # a 16-bit mask code: uint16 0 .. 65535 lattice steps above min_lr


def unpack_bits(packed: Tensor, numel: int) -> Tensor:
    """(B, ceil(numel / 8)) uint8, bit j of byte k = element 8k + j, -> (B, numel) uint8 of 0/1."""
    words = packed.to(torch.int64).mul_(_SPREAD_BYTE).bitwise_and_(_SELECT_BITS)
    bits = words.view(torch.uint8).clamp_(max=1)  # byte j held 0 or 1 << j: now 0 or 1
    return bits if bits.shape[1] == numel else bits[:, :numel]


def pack_bits_(packed: Tensor, bits: Tensor) -> Tensor:
    """The inverse of ``unpack_bits``: (B, numel) bytes of 0/1 written into ``packed`` (in place)."""
    batch, numel = bits.shape
    if numel != 8 * packed.shape[1] or not bits.is_contiguous() or bits.storage_offset() % 8:
        padded = bits.new_zeros((batch, 8 * packed.shape[1]))
        padded[:, :numel] = bits
        bits = padded
    words = bits.view(torch.int64).mul(_GATHER_BITS).bitwise_right_shift_(56).bitwise_and_(0xFF)
    return packed.copy_(words)


def lr_mask_codec(min_lr: float, max_lr: float, lr_bump: float) -> tuple[float, float]:
    """The lattice of a 16-bit lr mask: (min_lr, step), mask = min_lr + step * n, n = 0 .. 65535.

    The mask moves by lr_bump (or lr_bump * d_coef) and is clamped to [min_lr, max_lr], so a
    lattice anchored at min_lr whose step divides lr_bump keeps every bump exactly, and min_lr
    itself; what can fall between lattice points are the start lr and max_lr (off by at most
    step / 2, which never grows) and a non-integer d_coef's bump (rounded to the nearest step).
    The step is the largest lr_bump / k that still spans [min_lr, max_lr] in 65535 steps.
    """
    span = max_lr - min_lr
    if span <= 0:
        return (min_lr, 0.0)
    if lr_bump <= 0:
        return (min_lr, span / _CODE_STEPS)
    _check_mask_lattice(min_lr, max_lr, lr_bump)  # checked before training too; bounds may change
    return (min_lr, lr_bump / math.floor(lr_bump * _CODE_STEPS / span))


def log_lr_mask_codec(min_lr: float, max_lr: float, log_bump: float) -> tuple[float, float, str]:
    """The lattice of a 16-bit mask under the multiplicative rule: (log min_lr, step, "log"),
    mask = min_lr * exp(step * n). Every move is a whole number of log_bump = log(1 + relative_bump)
    steps in log(lr), so a step that divides log_bump keeps every move exactly, as the linear
    lattice does for the additive rule."""
    _check_mask_lattice(min_lr, max_lr, log_bump, rule="multiplicative")
    anchor, span = math.log(min_lr), math.log(max_lr / min_lr)
    if span <= 0:
        return (anchor, 0.0, "log")
    if log_bump <= 0:
        return (anchor, span / _CODE_STEPS, "log")
    return (anchor, log_bump / math.floor(log_bump * _CODE_STEPS / span), "log")


def _check_mask_lattice(min_lr: float, max_lr: float, lr_bump: float, where: str = "",
                        rule: str = "additive") -> None:
    """The 16-bit mask holds (max_lr - min_lr) / lr_bump bumps at least once each (on the log
    lattice: log(max_lr / min_lr) / log(1 + relative_bump))."""
    if rule == "multiplicative":
        _check_range("min_lr" + where, min_lr, min_lr > 0,
                     "min_lr > 0 with mask_rule='multiplicative' and state_precision='bf16' (its 16-bit mask "
                     "is a count of steps in log(lr) above log(min_lr))")
        span = math.log(max_lr / min_lr)
        holds = lr_bump <= 0 or span <= 0 or math.floor(lr_bump * _CODE_STEPS / span) >= 1
        _check_range("relative_bump" + where, math.expm1(lr_bump), holds,
                     f"a move log(1 + relative_bump) >= log(max_lr / min_lr) / {_CODE_STEPS} with "
                     f"state_precision='bf16' (here min_lr={min_lr}, max_lr={max_lr})")
        return
    span = max_lr - min_lr
    holds = lr_bump <= 0 or span <= 0 or math.floor(lr_bump * _CODE_STEPS / span) >= 1
    _check_range("lr_bump" + where, lr_bump, holds,
                 f"lr_bump = 0 or lr_bump >= (max_lr - min_lr) / {_CODE_STEPS} = {span / _CODE_STEPS:.3g} with "
                 f"state_precision='bf16' (its mask is a 16-bit count of steps; here min_lr={min_lr}, "
                 f"max_lr={max_lr})")


def encode_lr_mask_(codes: Tensor, lr_mask: Tensor, codec: tuple[float, float]) -> Tensor:
    """Float32 ``lr_mask`` within [min_lr, max_lr] (clobbered) -> the nearest lattice point, into
    uint16 ``codes``. The conversion truncates, so adding 0.5 first rounds to nearest; the float
    error of a code (~0.01 of a step) is far from the 0.5 that would change it."""
    anchor, step = codec[0], codec[1]
    inverse = 1.0 / step if step > 0 else 0.0
    if codec[2:] == ("log",):  # the multiplicative rule's lattice in log(lr)
        lr_mask = lr_mask.log_()
    return codes.copy_(lr_mask.mul_(inverse).add_(0.5 - anchor * inverse))


def decode_lr_mask(codes: Tensor, codec: tuple[float, float], dtype: torch.dtype = torch.float32,
                   out: Optional[Tensor] = None) -> Tensor:
    """uint16 codes -> the float mask, min_lr + step * code (precise near min_lr, where relative
    error would matter most); into ``out`` when given."""
    anchor, step = codec[0], codec[1]
    mask = codes.to(dtype) if out is None else out.copy_(codes)
    mask = mask.mul_(step).add_(anchor)
    return mask.exp_() if codec[2:] == ("log",) else mask


def _encode_lr_mask_scalar(value: Union[float, Tensor], codec: tuple[float, float]) -> Union[int, Tensor]:
    """One lr's code; a tensor lr's as a 0-d float64 tensor, computed where it lives (unread)."""
    anchor, step = codec[0], codec[1]
    log = codec[2:] == ("log",)
    if torch.is_tensor(value):
        value = value.double().log() if log else value.double()
        code = value.sub(anchor).div_(step).round_() if step > 0 else value.zero_()
        return code.clamp_(0, _CODE_STEPS)
    if log:
        value = math.log(value)
    return min(max(round((value - anchor) / step), 0), _CODE_STEPS) if step > 0 else 0


# Rounding noise of a compact state and of bf16 weights: counter-based, read from one fixed table
# instead of drawn from a generator. A CPU generator (mt19937) costs more per element than the whole rounding,
# and must be reseeded per tensor; the table costs one add per element and nothing to seed, and
# a kernel reads the same table, so the eager and fused steps round a state identically.
NOISE_PERIOD = 1 << 16
NOISE_PERIOD_STRIDE = 0x9E37  # each further period of a tensor starts this far on in the table
_MASK64 = (1 << 64) - 1
_NOISE_TABLES: dict = {}  # device -> the table twice over, int32 (512 KB)


def rounding_noise_table(device: Union[str, torch.device] = "cpu") -> Tensor:
    """A fixed permutation of 0 .. 65535 (an invertible 16-bit hash: odd multiplies and xor-shifts),
    stored twice over so any 65536 consecutive entries are one view. Read from a uniformly random
    offset, every entry is exactly uniform on 0 .. 65535: 16 bits of stochastic-rounding noise."""
    device = torch.device(device)
    table = _NOISE_TABLES.get(device)
    if table is None:
        x = torch.arange(NOISE_PERIOD, dtype=torch.int64)
        for multiplier, shift in ((0x9E37, 7), (0x85EB, 9), (0xC2B3, 8)):
            x = (x * multiplier) & 0xFFFF  # odd multiplier: a bijection modulo 2**16
            x ^= x >> shift  # a xor-shift of a non-negative 16-bit value: a bijection too
        table = _NOISE_TABLES[device] = x.to(torch.int32).repeat(2).to(device)
    return table


def rounding_noise_offset(seed: int) -> int:
    """Where in the table one tensor's noise starts at one step: splitmix64's finaliser of the
    (tensor, step) seed (Steele et al. 2014, doi 10.1145/2660193.2660195), 16 bits of it."""
    z = (seed + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & (NOISE_PERIOD - 1)


def offsets_tensor(offsets: list, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Host integers as a tensor on ``device``; to a GPU from pinned memory without blocking (a
    plain host-to-GPU copy would wait for the GPU: a host sync in the step)."""
    values = torch.tensor(offsets, dtype=dtype)
    return values.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else values.to(device)


def noise_index(offset: Union[int, Tensor], i: Union[int, Tensor]) -> Union[int, Tensor]:
    """Where element i of a tensor whose noise starts at ``offset`` reads the table: consecutive
    entries, the start moved on by NOISE_PERIOD_STRIDE every 65536 elements so that elements one
    period apart (a column of a 512-, 1024-, ... wide matrix) do not round with the same noise."""
    return (i + offset + (i >> 16) * NOISE_PERIOD_STRIDE) & (NOISE_PERIOD - 1)


def add_rounding_noise_(bits: Tensor, offsets: list[int], gather: Optional[bool] = None) -> Tensor:
    """``bits`` (B, numel) int32 += table[noise_index(offsets[b], i)], in place. On CPU row by row,
    each period of 65536 elements from one view of the table; on a GPU (or with ``gather``) one
    gather, rather than a launch per row and period."""
    batch, numel = bits.shape
    table = rounding_noise_table(bits.device)
    if gather if gather is not None else _launch_bound(bits.device):
        starts = offsets_tensor(offsets, torch.int64, bits.device).unsqueeze(1)
        return bits.add_(table[noise_index(starts, torch.arange(numel, device=bits.device))])
    for row, offset in zip(bits, offsets):
        for start in range(0, numel, NOISE_PERIOD):
            length = min(NOISE_PERIOD, numel - start)
            first = noise_index(offset, start)  # the period's first entry; the rest follow it
            row[start:start + length].add_(table[first:first + length])
    return bits


# ----------------------------------------------------------------------------------------------
# Composition: one bucket = tensors of one group that share shape, dtype, device and phase.
# ----------------------------------------------------------------------------------------------


def _matrix_shape(shape: torch.Size) -> tuple[int, ...]:
    """Matrices and conv kernels are treated as (out_channels, -1); vectors and scalars as (n,)."""
    numel = math.prod(shape)
    return (shape[0], numel // shape[0] if shape[0] else 0) if len(shape) >= 2 else (numel,)


def _as_matrix_view(tensor: Tensor) -> Tensor:
    return tensor.reshape(_matrix_shape(tensor.shape))


def _share_shape(tensors: list[Tensor]) -> bool:
    """Whether a bucket's tensors have one shape; a bucket may mix a (out, in) linear with an
    (out, in, 1, 1) conv, which share the matrix shape only."""
    return all(t.shape == tensors[0].shape for t in tensors)


def _same_shape(tensors: list[Tensor], shape: tuple[int, ...]) -> list[Tensor]:
    """The tensors as they are when they share a shape, else each viewed as ``shape``."""
    return tensors if _share_shape(tensors) else [t.reshape(shape) for t in tensors]


def _is_padded(tensors: list[Tensor], shape: tuple[int, ...]) -> bool:
    """Whether the bucket is vectors of different lengths, stacked zero-padded to ``shape``."""
    return any(t.numel() != math.prod(shape) for t in tensors)


def _padded_rows(stacked: Tensor, tensors: list[Tensor]) -> list[Tensor]:
    """Each tensor's own elements in its row of a (B, L) stack, as flat contiguous views."""
    return [row[:t.numel()] for row, t in zip(stacked.unbind(0), tensors)]


def _padded_stack(tensors: list[Tensor], shape: tuple[int, ...]) -> tuple[Tensor, list[Tensor]]:
    """Vectors of different lengths as one zero-padded (B, *shape) copy, and each one's row in it."""
    stacked = torch.zeros((len(tensors),) + shape, dtype=tensors[0].dtype, device=tensors[0].device)
    rows = _padded_rows(stacked, tensors)
    _copy_into_rows(rows, tensors)
    return stacked, rows


def _copy_into_rows(rows: list[Tensor], tensors: list[Tensor]) -> None:
    """``rows[i].copy_(tensors[i])`` as one multi-tensor copy. CUDA's multi-tensor copy has no
    unsigned 16-bit kernel: the bf16 state's mask codes are copied as the int16 they are bit for bit."""
    sources = [t.reshape(-1) for t in tensors]
    if rows and rows[0].dtype == torch.uint16:
        rows, sources = [r.view(torch.int16) for r in rows], [t.view(torch.int16) for t in sources]
    torch._foreach_copy_(rows, sources)


def _gathers_as_view(tensors: list[Tensor], dtype: Optional[torch.dtype] = None) -> bool:
    """Whether ``_gather`` returns a view of the tensor itself (so in-place math lands in it): a
    single contiguous tensor already in ``dtype``. Decided from shapes and strides alone, never
    from ``data_ptr()``, so it holds under ``torch.compile`` too."""
    return len(tensors) == 1 and tensors[0].is_contiguous() and (dtype is None or tensors[0].dtype == dtype)


def _gather(tensors: list[Tensor], shape: tuple[int, ...], dtype: Optional[torch.dtype] = None) -> Tensor:
    """Stack same-shape tensors to (B, *shape); a single contiguous tensor becomes a view, no copy,
    anything else a fresh copy (see ``_gathers_as_view``)."""
    if len(tensors) == 1:
        stacked = tensors[0].reshape((1,) + shape)
        if not tensors[0].is_contiguous():
            # reshape may return a strided view (a transposed matrix) or a copy (channels_last):
            # make it always a copy, so the caller knows which one it holds.
            stacked = stacked.contiguous()
    elif _is_padded(tensors, shape):
        stacked = _padded_stack(tensors, shape)[0]
    else:
        stacked = torch.stack(_same_shape(tensors, shape)).reshape((len(tensors),) + shape)
    return stacked if dtype is None or stacked.dtype == dtype else stacked.to(dtype)


def _stacked_state(states: list[dict], key: str, shape: tuple[int, ...], cache: dict) -> Tensor:
    """The (B, *shape) stack of one state entry, updated in place by the step.

    The first time a bucket is seen its state tensors are copied into one buffer and the state
    is pointed at views of it; from then on the stack is free (no copy in, no copy out). ``cache``
    remembers the views it handed out, so later steps only check that the state still holds
    those very tensors. After a resume, or when a bucket changes members, the views no longer
    line up and the stack is rebuilt once.
    """
    tensors = [s[key] for s in states]
    if len(tensors) == 1:
        if not tensors[0].is_contiguous():
            # A channels_last or transposed state tensor (loaded so, e.g. from an older version
            # that made state like its parameter) would reshape into a copy and the in-place
            # updates would be lost: store it dense.
            states[0][key] = tensors[0] = tensors[0].contiguous()
        return tensors[0].view((1,) + shape)
    known = cache.get(key)
    if known is not None and all(map(operator.is_, tensors, known[0])):
        return known[1]
    base = tensors[0]._base
    row = math.prod(shape)
    if (base is not None and base.is_contiguous() and base.numel() == row * len(tensors)
            and all(t._base is base and t.storage_offset() - base.storage_offset() == i * row
                    for i, t in enumerate(tensors))):
        stacked = base.view((len(tensors),) + shape)
    elif _is_padded(tensors, shape):
        # vectors of different lengths: each state tensor becomes the front of its zero-padded row
        stacked, rows = _padded_stack(tensors, shape)
        for state, view, old in zip(states, rows, tensors):
            state[key] = view.view(old.shape)
    else:
        stacked = torch.stack(_same_shape(tensors, shape)).reshape((len(tensors),) + shape)
        for state, view, old in zip(states, stacked.unbind(0), tensors):
            state[key] = view.view(old.shape)
    cache[key] = ([s[key] for s in states], stacked)
    return stacked


def _bucket_stack(states: list[dict], key: str, params: list[Tensor], shape: tuple[int, ...],
                  cache: dict) -> Optional[Tensor]:
    """A bucket's state ``key`` stacked (None where it has none): (B, *shape) for per-element
    state, (B,) for per-tensor scalars, (B, rows) for ALLoRA, (B, bytes) for packed bits."""
    if key not in states[0]:
        return None
    own_shape = states[0][key].shape
    # By key, not by shape: a 0-d parameter's per-element state is 0-d like its scalars.
    per_element = key not in _PER_TENSOR_STATE and own_shape == params[0].shape
    return _stacked_state(states, key, shape if per_element else tuple(own_shape), cache)


def _scatter(stacked: Tensor, tensors: list[Tensor]) -> None:
    """Write a stack (a copy, see ``_gathers_as_view``) back into its tensors."""
    if _share_shape(tensors):  # one reshape instead of a view per tensor
        sources = list(stacked.reshape((len(tensors),) + tensors[0].shape).unbind(0))
    else:  # a matrix shape shared by a linear and a 1x1 conv, or a padded stack of vectors
        sources = [s.reshape(-1)[:t.numel()].view_as(t) for s, t in zip(stacked.unbind(0), tensors)]
    torch._foreach_copy_(tensors, sources)


# State entries holding one value per tensor (0-d), whatever the parameter's shape.
_PER_TENSOR_STATE = frozenset({"avg_lr", "avg_lr_max", "lr_decay", "decay_rate", "lr_growth"})


class _Phase:
    """Which techniques apply at a tensor's step t; the same for every tensor of a bucket."""

    __slots__ = ("first", "warmup", "early", "orthograd", "post", "growing")

    def __init__(self, t: int, warmup_steps: int, orthograd_on: bool, is_matrix: bool,
                 growth_steps: Optional[int] = None):
        self.first = t == 1
        self.warmup = t < warmup_steps               # mask still adapting
        # the opt-in lr_growth factor still adapting: in warm-up, up to its own step limit
        self.growing = self.warmup and (growth_steps is None or t <= growth_steps)
        self.early = t < warmup_steps / 2            # Prodigy signal and weight decay
        self.orthograd = orthograd_on and is_matrix and t > warmup_steps
        self.post = t >= warmup_steps                # mask frozen, linear decay

    def key(self) -> tuple:
        return (self.first, self.warmup, self.early, self.orthograd, self.post, self.growing)


def _finite_or_zeroed(grad: Tensor, in_place: bool, finite: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """The gradient with NaN/Inf elements set to 0, and which stacked tensors were all finite, as
    1.0 / 0.0 in the gradient's dtype (B,).

    A tensor that held a NaN/Inf is skipped by multiplying each of its per-tensor rates by
    ``finite`` (so its weights and state updates are exact no-ops); its other elements stay, and
    only need to be finite. The test sums each tensor (NaN and Inf survive a sum; a finite sum
    would have to overflow float32, |g| ~ 1e34, to be flagged) instead of a float-to-bool isfinite
    over every element, which is an order of magnitude slower on CPU. ``in_place`` only when
    ``grad`` is a stacked copy, never a view of the caller's .grad. The sum times 0 is 0 exactly
    when the sum is finite (NaN otherwise): two kernels, where ``isfinite`` takes four and a
    conversion to float one more. ``finite``, where given, is that flag computed before (see
    ``finite_flags``).
    """
    if finite is None:
        finite = grad.reshape(grad.shape[0], -1).sum(dim=1).mul_(0.0).eq_(0.0)
    elif finite.dtype != grad.dtype:
        finite = finite.to(grad.dtype)
    clean = torch.nan_to_num_ if in_place else torch.nan_to_num
    return clean(grad, nan=0.0, posinf=0.0, neginf=0.0), finite


def finite_flags(grads: list[Tensor]) -> Tensor:
    """Which tensors' gradients are all finite, as 1.0 / 0.0 (N,), for a whole group at once: one
    multi-tensor L1 norm (NaN and Inf survive it, as they survive ``_finite_or_zeroed``'s sum)
    instead of three launches per bucket, where launches are the cost (a GPU). The two tests
    differ only for gradients whose sum overflows float32, |g| ~ 1e34, flagged a little earlier
    here (the sum of |g| overflows first). Each norm comes out in its gradient's dtype (the
    ``dtype=`` argument is not in every torch this supports), so float16 gradients, whose norm
    would overflow at 65504, are not taken (``_FLAGGED_DTYPES``); bfloat16 has float32's range."""
    wide = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
    return torch.stack(torch._foreach_norm(grads, 1)).to(wide).mul_(0.0).eq_(0.0)


_FLAGGED_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def _bucket_math(grad: Tensor, exp_avg: Tensor, lr_mask: Tensor, polarity: Optional[Tensor],
                 weight: Tensor, initial_weight: Optional[Tensor], avg_lr: Tensor, avg_lr_max: Tensor,
                 row_scaling: Optional[Tensor], lr_decay: Optional[Tensor], decay_rate: Optional[Tensor],
                 group_mean: Optional[Tensor], group_std: Optional[Tensor], lr_ratio: Union[float, Tensor], *,
                 warmup: bool, early: bool, use_orthograd: bool, post: bool, is_matrix: bool,
                 beta1: float, lr_bump: float, d_coef: float, min_lr: float, max_lr: float,
                 weight_decay: float, sinkgd_iters: int, grams: bool, vradam: bool,
                 grad_is_copy: bool, decay_floor: float = 0.1, mask_rule: str = "additive",
                 mean_weights: Optional[Tensor] = None, finite: Optional[Tensor] = None,
                 lr_growth: Optional[Tensor] = None, growth_rate: float = 0.0, growth_max: float = 1.0,
                 growing: bool = False) -> Tensor:
    """Steps 2-9 of the step (t >= 2) on stacked tensors (B, ...), tensor code only: no host
    reads. Updates exp_avg, lr_mask, polarity, avg_lr, avg_lr_max, lr_decay and ``weight`` (the
    parameters themselves, or their stacked or float32 copy) in place and returns ``weight``.
    ``grad`` may be overwritten when ``grad_is_copy``, never when it views the caller's .grad.
    ``mean_weights`` (B, L) marks a zero-padded stack of vectors (see ``_row_means``); ``finite``
    (B,) is the gradients' finite test where it was made for the whole group (``finite_flags``);
    ``lr_growth`` (B,), where given, the per-tensor factor of ``momentum_agreement_growth_``
    (opt-in), grown while ``growing`` and applied at every step."""
    batch = grad.shape[0]
    # From here on ``grad`` is this step's own buffer (a stacked copy, or the cleaned copy of a
    # lone tensor's .grad), so it can be overwritten once its values are no longer needed.
    grad, finite_f = _finite_or_zeroed(grad, in_place=grad_is_copy, finite=finite)

    # 2. direction, from the momentum before this step (ADOPT's ordering).
    update = grams_direction(grad, exp_avg, is_matrix) if grams else exp_avg.clone()
    if use_orthograd:
        # SinkGD rescales every row and column afterwards, so OrthoGrad's norm restore (a
        # per-tensor scalar) would be undone; it is only computed when SinkGD is off.
        update = orthograd(update, weight, keep_norm=sinkgd_iters <= 0)

    # opt-in: the per-tensor factor grows in warm-up, from the momentum before this step.
    if lr_growth is not None and growing:
        momentum_agreement_growth_(lr_growth, grad, exp_avg, growth_rate, growth_max, finite_f, mean_weights)

    # 3. momentum; a skipped tensor gets weight 0 and keeps its exp_avg bit for bit.
    exp_avg.lerp_(grad, _per_tensor((1 - beta1) * finite_f, grad))
    # per-tensor rate: 0 for a skipped tensor, times the VRAdam brake
    rate = vradam_brake(exp_avg, keep=finite_f) if vradam else finite_f
    if lr_growth is not None:
        rate = rate * lr_growth

    # 4-5. Prodigy signal and the learning-rate mask, during warm-up only.
    if warmup:
        signal = None
        if early and d_coef != 1 and initial_weight is not None:
            signal = prodigy_signal(grad, weight, initial_weight)
        # a skipped tensor's bumps are 0: its mask stays bit for bit
        up, down = prodigy_bumps(lr_bump, d_coef, signal, batch, lr_mask, keep=finite_f)
        flips = sign_flips_(grad, polarity, keep=finite_f.bool())
        mask_update_ = rprop_mask_update_ if mask_rule == "multiplicative" else automagic_mask_update_
        mask_update_(lr_mask, flips, up, down, min_lr, max_lr)
        del flips
        _row_means(lr_mask, mean_weights, out=avg_lr)
        _store(torch.maximum, avg_lr_max, avg_lr_max, avg_lr)

    # 8 (its statistics). The gradient's signs are used up: take |g| in place.
    decay_theta = None
    if early and weight_decay > 0:
        decay_theta = 1.0  # neutral, until the fused path has gathered a first set of statistics
        if group_mean is not None:
            abs_grad_mean = _row_means(grad.abs_(), mean_weights)
            decay_theta = gradient_scaled_decay(abs_grad_mean, group_mean, group_std)

    # 6. after warm-up: frozen mask, linear decay capped by an outside scheduler.
    if post:
        lr_decay.addcmul_(decay_rate, finite_f, value=-1.0)  # a skipped tensor's decay does not advance
        rate = post_warmup_decay(lr_decay, lr_ratio, decay_floor) * rate

    # 7. effective per-element lr = mask * ALLoRA row factor * VRAdam brake * decay.
    row_scaling = row_scaling.unsqueeze(-1) if row_scaling is not None else None  # (B, rows, 1)
    if is_matrix:
        row_scale, col_scale = sinkgd_scalings(update, sinkgd_iters, scratch=grad)
        row_factor = row_scale * _per_tensor(rate, row_scale)
        if row_scaling is not None:
            row_factor = row_factor * row_scaling
        update.mul_(row_factor).mul_(col_scale)
    else:
        update.mul_(_per_tensor(rate, update))

    # 8. gradient-aware decoupled weight decay, first half of warm-up only.
    if decay_theta is not None:
        # avg_lr x mean row scaling x brake x theta x weight_decay, 0 for a skipped tensor: here
        # (early, so not post) ``rate`` is finite x brake (x the opt-in growth factor), the same
        # product in the same order.
        decay = avg_lr * row_scaling.mean(dim=(1, 2)) * rate if row_scaling is not None else avg_lr * rate
        decay = decay * decay_theta * weight_decay
        weight.mul_(_per_tensor(1.0 - decay, weight))

    # 9. w = w - mask * update.
    return weight.addcmul_(update, lr_mask, value=-1.0)


_KERNELS: list = []  # [module or None] once the fused kernels have been asked for


def _fused_kernels():
    """The Triton kernels of the opt-in fused step, imported on first use; None (the eager step
    runs) where Triton cannot be imported. They live in a sibling module so this file stays
    torch-only."""
    if not _KERNELS:
        import importlib
        import warnings
        name = (__package__ + "." if __package__ else "") + "automagic_sinkgd_kernels"
        try:
            _KERNELS.append(importlib.import_module(name))
        except ImportError as error:
            warnings.warn(f"Automagic_Sinkgd: fused=True but the fused kernels cannot be imported ({error}); "
                          "using the eager step.", RuntimeWarning, stacklevel=3)
            _KERNELS.append(None)
    return _KERNELS[0]


def _fused_step_bucket(kernels, *args) -> bool:
    """``kernels.step_bucket``; on any error from Triton or the driver (a GPU or driver it cannot
    compile for, a failed launch) the fused kernels are dropped with one warning and the eager step
    runs, this bucket included. The split path's kernels compile at their first launch: one failing
    after an earlier launch of the same bucket already stepped its state would step that state
    twice, once; on the GPUs the kernels are checked for (sm_80, sm_90) none fails."""
    try:
        return kernels.step_bucket(*args)
    except Exception as error:  # noqa: BLE001 - whatever Triton raises, training goes on eagerly
        import warnings
        _KERNELS[:] = [None]
        warnings.warn(f"Automagic_Sinkgd: the fused kernels failed ({type(error).__name__}: {error}); "
                      "using the eager step from now on.", RuntimeWarning, stacklevel=4)
        return False


def _settings_the_kernels_lack(group: dict) -> list[tuple[str, str]]:
    """(setting, how to switch it off) for each of the group's settings the fused kernels do not
    implement: the multiplicative mask."""
    lacking = []
    if group.get("mask_rule", "additive") != "additive":
        lacking.append(("mask_rule='multiplicative'", "mask_rule='additive'"))
    return lacking


def _fused_phase(group: dict, phase: _Phase) -> bool:
    """Whether the fused kernels are asked for and cover this phase: from t = 2 (ADOPT's first
    step is eager), and none of the settings they lack."""
    return bool(group.get("fused")) and not phase.first and not _settings_the_kernels_lack(group)


def _warn_if_fused_is_not_used(group: dict, where: str) -> None:
    """fused=True with a setting the kernels do not implement: say once, at construction, that
    this group takes the eager step (the same math), rather than leave a user timing kernels that
    never run."""
    lacking = _settings_the_kernels_lack(group)
    if group.get("fused") and lacking:
        import warnings
        warnings.warn(f"Automagic_Sinkgd: fused=True{where}, but the fused kernels do not implement "
                      f"{' or '.join(name for name, _ in lacking)}: this group takes the eager step (the same "
                      f"math). {' and '.join(off for _, off in lacking)} would let the kernels step it.",
                      UserWarning, stacklevel=5)


def _step_bucket(params: list[Tensor], grads: list[Tensor], states: list[dict], group: dict,
                 phase: _Phase, is_matrix: bool, group_stats: Optional[tuple],
                 generator_for: Callable[[Tensor, int], torch.Generator], weight_seeds: list[int],
                 stack_cache: dict, state_seeds: Optional[list[int]] = None,
                 workspace: Optional[Callable[[str, tuple, torch.dtype, torch.device], Tensor]] = None,
                 finite: Optional[Tensor] = None) -> None:
    """Gather a bucket's stacks, run the math, write the weights back (stochastic rounding for
    bf16/fp16 weights, whose update is computed in float32; ``weight_seeds`` seed it per tensor:
    bf16 from the rounding table, fp16 from a generator seeded by the first). ``stack_cache``
    belongs to this bucket (see ``_stacked_state``). A compact state (``state_precision="bf16"``)
    is loaded to float32 around the same math and stored back; ``state_seeds`` seed its rounding
    per tensor, and ``workspace`` lends the float32 buffers it is loaded into (see ``_workspace``).
    ``finite`` (B,): the gradients' finite test, where the caller made it for the whole group."""
    shape = _matrix_shape(params[0].shape)
    padded = _is_padded(params, shape)
    # The kernels take tensors of one shape; a padded stack of vectors (the eager step's own) never.
    if _fused_phase(group, phase) and not padded:
        kernels = _fused_kernels()
        if kernels is not None and _fused_step_bucket(kernels, params, grads, states, group, phase, is_matrix,
                                                      group_stats, weight_seeds, state_seeds, stack_cache):
            return
    compact = group["state_precision"] != "fp32"
    # The math's dtype: float32, or float64 for float64 weights, whatever the storage.
    state_dtype = torch.promote_types(params[0].dtype, torch.float32) if compact else states[0]["exp_avg"].dtype
    batch, numel = len(params), math.prod(shape)
    if workspace is None:
        def workspace(name, buffer_shape, dtype, device):
            return torch.empty(buffer_shape, dtype=dtype, device=device)
    noise_offsets = [rounding_noise_offset(seed) for seed in state_seeds] if compact else None

    def state(key: str) -> Optional[Tensor]:
        return _bucket_stack(states, key, params, shape, stack_cache)

    grad = _gather(grads, shape, state_dtype)
    grad_is_copy = not _gathers_as_view(grads, state_dtype)
    mean_weights = None
    if padded:
        lengths = (tuple(p.numel() for p in params), state_dtype)
        known = stack_cache.get("mean_weights")
        if known is None or known[0] != lengths:
            known = stack_cache["mean_weights"] = (lengths, _padded_mean_weights(params, numel, state_dtype))
        mean_weights = known[1]
    if phase.first:
        # ADOPT (Taniguchi et al. 2024, arXiv 2411.02853): the first step only initialises state.
        grad, finite = _finite_or_zeroed(grad, in_place=grad_is_copy, finite=finite)
        grad = grad * _per_tensor(finite, grad)  # a skipped tensor starts from zero state
        if not compact:
            state("exp_avg").copy_(grad).mul_(1 - group["beta1"])
            if phase.warmup:
                state("polarity").copy_(grad > 0)
            return
        if phase.warmup:
            pack_bits_(state("polarity"), (grad > 0).view(torch.uint8).reshape(batch, numel))
        momentum = grad.mul_(1 - group["beta1"]).reshape(batch, numel).to(torch.float32)
        stochastic_round_(state("exp_avg"), momentum, noise_offsets=noise_offsets)
        return
    if compact:
        codec = states[0]["lr_mask_codec"]
        stored = state("exp_avg")
        exp_avg = workspace("exp_avg", stored.shape, state_dtype, stored.device).copy_(stored)
        lr_mask = decode_lr_mask(state("lr_mask"), codec,
                                 out=workspace("lr_mask", stored.shape, state_dtype, stored.device))
        packed = state("polarity")
        polarity = unpack_bits(packed, numel).reshape((batch,) + shape) if packed is not None else None
    else:
        exp_avg, lr_mask, polarity = state("exp_avg"), state("lr_mask"), state("polarity")
    lr_ratio = group["lr"] / group["lr_max"]
    new_weight = _bucket_math(
        grad, exp_avg, lr_mask, polarity, _gather(params, shape, state_dtype),
        state("initial_weight"), state("avg_lr"), state("avg_lr_max"), state("row_scaling"),
        state("lr_decay"), state("decay_rate"), *(group_stats or (None, None)), lr_ratio,
        warmup=phase.warmup, early=phase.early, use_orthograd=phase.orthograd, post=phase.post,
        is_matrix=is_matrix, beta1=group["beta1"], lr_bump=group["lr_bump"], d_coef=group["d_coef"],
        min_lr=group["mask_min_lr"], max_lr=group["mask_max_lr"], weight_decay=group["weight_decay"],
        sinkgd_iters=group["sinkgd_iters"], grams=group["grams"], vradam=group["vradam"],
        grad_is_copy=grad_is_copy, decay_floor=group["decay_floor"], mask_rule=group["mask_rule"],
        mean_weights=mean_weights, finite=finite,
        lr_growth=state("lr_growth") if group["lr_growth"] else None,
        growth_rate=group["lr_growth"] or 0.0, growth_max=group["lr_growth_max"], growing=phase.growing)
    if params[0].dtype == state_dtype:
        if not _gathers_as_view(params, state_dtype):  # else the math ran on the parameter itself
            _scatter(new_weight, params)
    else:
        rounded = torch.empty(new_weight.shape, dtype=params[0].dtype, device=new_weight.device)
        if rounded.dtype == torch.bfloat16:
            stochastic_round_(rounded, new_weight, noise_offsets=[rounding_noise_offset(s) for s in weight_seeds])
        else:
            stochastic_round_(rounded, new_weight, generator_for(new_weight, weight_seeds[0]))
        _scatter(rounded, params)
    if compact:
        del new_weight, grad
        if phase.warmup:  # the mask and the signs are frozen after warm-up: nothing to write
            encode_lr_mask_(state("lr_mask"), lr_mask, codec)
            pack_bits_(packed, polarity.reshape(batch, numel))
        del lr_mask, polarity
        stochastic_round_(state("exp_avg"), exp_avg.reshape(batch, numel).to(torch.float32),
                          noise_offsets=noise_offsets)


def _padded_vector_chunks(members: list, limit: int) -> Iterable[list]:
    """Vectors (biases, norms) of every length stepped as few zero-padded (B, L) stacks, longest
    first: on a GPU each bucket costs ~50 launches whatever its size, and a model has a bucket per
    vector length (8 for an SD1.5 U-Net's, all under 6K elements). A chunk's padding is bounded:
    it holds at most ``limit`` elements, and at most 4x its tensors' own beyond 1M elements."""
    members = sorted(members, key=lambda m: -m[1].numel())  # stable: equal lengths keep their order
    chunk: list = []
    own = 0
    for member in members:
        numel = member[1].numel()
        length = chunk[0][1].numel() if chunk else numel
        padded = (len(chunk) + 1) * length
        if chunk and (padded > limit or padded > max(4 * (own + numel), _PADDED_VECTORS_FREE)):
            yield chunk
            chunk, own = [], 0
        chunk.append(member)
        own += numel
    if chunk:
        yield chunk


# Padding up to this many elements (4 MB of float32) is always worth a bucket's launches.
_PADDED_VECTORS_FREE = 1 << 20


# ----------------------------------------------------------------------------------------------
# The optimizer.
# ----------------------------------------------------------------------------------------------


def _running_max(lr_max, lr):
    """max(lr_max, lr) that reads no tensor lr on the host and never returns the lr tensor itself
    (a scheduler updates a tensor lr in place, which would drag an aliased lr_max down with it)."""
    if torch.is_tensor(lr_max):
        return torch.maximum(lr_max, lr) if torch.is_tensor(lr) else lr_max.clamp_min(lr)
    return lr.clamp_min(lr_max) if torch.is_tensor(lr) else max(lr_max, lr)


def _start_lr(lr) -> Union[float, Tensor]:
    """A group lr as a fill value: a float, or a 1-element tensor lr (as torch allows) as a 0-d
    tensor that fills the new state where it lives, never read on the host."""
    return lr.reshape(()) if torch.is_tensor(lr) else lr


# torch cannot unpickle tensors of these dtypes (a torch.save round-trip works): pickling and
# spawned workers carry them as the signed type of the same width, bit for bit.
_UNPICKLABLE_AS = {torch.uint16: torch.int16, torch.uint32: torch.int32, torch.uint64: torch.int64}


# Settings added after the document (opt-in), with the values that give the document's step.
_OPT_IN_DEFAULTS = dict(relative_bump=None, decay_horizon="warmup", decay_floor=0.1, total_steps=None,
                        mask_rule="additive", mask_bump_decay=None, lora_scale=None, lora_scale_power=0.0,
                        lora_scale_power_above=None, lora_lr_factor=1.0, max_warmup_steps=None,
                        lr_growth=None, lr_growth_max=10.0, lr_growth_steps=None)
MASK_RULES = ("additive", "multiplicative")


def _planned_warmup(group: dict) -> int:
    """The group's warm-up in steps for its present settings (``warmup_length``)."""
    return warmup_length(group["warmup_steps"], group["total_steps"], group["max_warmup_steps"])


def _group_mask_codec(group: dict) -> tuple:
    """The 16-bit mask's lattice for a group's bounds and mask rule."""
    if group.get("mask_rule", "additive") == "multiplicative":
        return log_lr_mask_codec(group["mask_min_lr"], group["mask_max_lr"], math.log1p(group["relative_bump"]))
    return lr_mask_codec(group["mask_min_lr"], group["mask_max_lr"], group["lr_bump"])


def _check_group_lattice(get: Callable[[str], Any], where: str) -> None:
    min_lr = get("mask_min_lr") if get("mask_min_lr") is not None else get("min_lr")
    max_lr = get("mask_max_lr") if get("mask_max_lr") is not None else get("max_lr")
    if get("mask_rule") == "multiplicative" and get("relative_bump") is not None:
        _check_mask_lattice(min_lr, max_lr, math.log1p(get("relative_bump")), where, rule="multiplicative")
    elif get("mask_rule") != "multiplicative":
        _check_mask_lattice(min_lr, max_lr, get("lr_bump"), where)


def _check_range(name: str, value: Any, ok: bool, allowed: str, hint: str = "") -> None:
    if not ok:
        raise ValueError(f"Automagic_Sinkgd: {name}={value!r} is out of range; allowed: {allowed}.{hint}")


class Automagic_Sinkgd(torch.optim.Optimizer):
    """SinkGD-normalised Grams/ADOPT steps with an Automagic per-element learning-rate mask.

    Args:
        params: parameters or parameter groups (each group may set its own ``lr`` and any
            argument below; the mask of a group starts at that group's lr).
        lr: base learning rate, within [min_lr, max_lr]; recommended 1e-6 .. 1e-4.
        min_lr, max_lr: bounds of the per-element learning-rate mask. Each group holds them as
            ``mask_min_lr`` / ``mask_max_lr`` (read every step; change those during training),
            because LR schedulers such as OneCycleLR write ``min_lr`` / ``max_lr`` keys of their own.
        lr_bump: one up/down move of the mask during warm-up (0 freezes the mask at lr).
        relative_bump: opt-in; when set, one mask move is relative_bump x the group's lr
            (overrides lr_bump); None keeps the absolute lr_bump.
        decay_horizon: "warmup" (default, the document) decays the rate linearly over another
            warmup_steps after warm-up; "run" (opt-in) over the rest of the run, up to total_steps.
        decay_floor: floor of the post-warm-up decay, in [0, 1] (0.1 in the document; 1 = no decay).
        total_steps: the run's planned optimizer steps (needed by decay_horizon="run"); the kohya
            hook and the built-in trainer fill it from max_train_steps unless it is set. A resumed
            run with another total_steps re-plans the post-warm-up decay to end at the new length
            (a warm-up that has ended stays ended).
        mask_rule: "additive" (default, the document: one move adds or subtracts lr_bump) or
            "multiplicative" (opt-in, Rprop's rule: one move multiplies or divides the element's lr
            by 1 + relative_bump, so the mask reaches a rate 100x away as fast as one 10x away;
            needs relative_bump; with state_precision="bf16" the mask is a 16-bit code on a
            log(lr) lattice, min_lr > 0; eager step only).
        mask_bump_decay: opt-in, with mask_rule="multiplicative": after this many steps the move
            shrinks as 1 / sqrt(step) (see ``annealed_log_bump``); None keeps it constant.
        lora_scale: the LoRA's alpha / rank (kohya's network_alpha / network_dim; the kohya hook
            fills it for network trainers). Read only with lora_scale_power.
        lora_scale_power: opt-in; every group's lr, min_lr, max_lr and absolute lr_bump are
            multiplied once, when the group is added, by (1 / lora_scale) ** lora_scale_power (see
            ``lora_scale_lr_factor``), so the lr you give is the one for alpha = rank. 0 (default)
            keeps them as given. The factor is kept in the group as ``lora_lr_factor``.
        lora_scale_power_above: the power where alpha > rank (lora_scale > 1); None (default)
            uses lora_scale_power (0: the lrs are only raised, for alpha below the rank).
        eta: ALLoRA strength (LoRA mode matrices); > 0.
        beta1: momentum decay, in [0, 1).
        d_coef: Prodigy-style speed-up of the mask in the first half of warm-up; >= 1 (1 = off).
        weight_decay: decoupled, gradient-aware weight decay strength (first half of warm-up).
        warmup_steps: steps during which the mask adapts: an integer >= 1, or a share in (0, 1)
            of total_steps (opt-in, kohya's --lr_warmup_steps convention; the kohya hook and the
            built-in trainer use 0.25 when neither your arguments nor the preset set it).
        max_warmup_steps: opt-in, None or an integer >= 1: the warm-up is at most this many steps
            (with a share: that share of a short run, this length on long ones).
        lr_growth: opt-in, None or a number in (0, 10]: during warm-up each tensor's rate is also
            multiplied by a factor that grows by exp(lr_growth x a) per step, a = the tensor's mean
            sign agreement of gradient and momentum (see ``momentum_agreement_growth_``), so a run
            whose lrs are far too small for its model climbs in tens of steps; frozen with the mask
            after warm-up. The fused kernels implement it too.
        lr_growth_max: the factor's bound, a number >= 1 (default 10: with 100, long warm-ups at
            real SD's rates crept up and lost 1 %; see docs/benchmarks.md).
        lr_growth_steps: None (default: all of warm-up) or an integer >= 1: the factor adapts only
            during the first this many steps (and never after warm-up).
        full_finetune: False = LoRA mode (4 SinkGD iterations, ALLoRA), True = 5 iterations.
        orthograd: apply OrthoGrad to matrix updates after warm-up.
        stats_update_freq: refresh the group's gradient statistics every N steps; >= 1.
        sinkgd_iters: override the SinkGD iteration count (0 disables SinkGD).
        grams: False uses the plain momentum as direction (ablation).
        vradam: False disables the VRAdam brake (ablation).
        allora: False disables ALLoRA row scaling (ablation).
        state_precision: how the per-element state is stored; the math is float32 either way
            (float64 for float64 weights). "fp32" (default): momentum and mask in float32, signs
            one byte each, x0 in the weights' dtype. "bf16": momentum in bf16 with stochastic
            rounding, the mask as a 16-bit count of lattice steps above min_lr that keeps every
            bump (see ``lr_mask_codec``), signs packed 8 per byte, x0 in bf16 (the weights' own
            dtype when they are 16-bit): 6.1 / 4.1 / 4 bytes per parameter in early warm-up / late
            warm-up / after, against 13 / 9 / 8 (11 / 9 / 8 with bf16 weights).
        foreach: None/True batch same-shape tensors into stacked kernels, False steps one tensor
            at a time (same math); per group, like the other settings.
        fused: True steps each bucket with Triton kernels (same math; one launch per bucket of
            LoRA-sized tensors, 2 + sinkgd_iters per chunk of large ones) where it applies: CUDA
            tensors of compute capability 8.0 or later with Triton installed, fp32/bf16 weights,
            the fp32 or bf16 state (in warm-up a bf16 state's packed signs need matrix rows of a
            whole number of bytes), a float lr, the additive mask (CPU tensors only under Triton's
            interpreter, ``TRITON_INTERPRET=1``, which the tests use); every other bucket, and
            every bucket with None (default) or False, takes the eager step.
    """

    # Group settings a resume takes from this optimizer, not from the saved state: storage and
    # execution choices (same math), which a resumed run may change (see load_state_dict).
    KEPT_ON_LOAD = ("state_precision", "foreach", "fused")
    # Settings lora_scale_power multiplies by the group's lora_lr_factor (the group also holds the
    # bounds as mask_min_lr / mask_max_lr, and a scheduler's base lr as initial_lr).
    LORA_SCALED = ("lr", "min_lr", "max_lr", "lr_bump")

    def __init__(self, params: Iterable, lr: float = 1e-5, min_lr: float = 1e-6, max_lr: float = 1e-2,
                 lr_bump: float = 1e-5, eta: float = 2, beta1: float = 0.9, d_coef: float = 2,
                 weight_decay: float = 5e-4, warmup_steps: int = 500, full_finetune: bool = False,
                 orthograd: bool = False, stats_update_freq: int = 5, sinkgd_iters: Optional[int] = None,
                 grams: bool = True, vradam: bool = True, allora: bool = True,
                 state_precision: str = "fp32", foreach: Optional[bool] = None,
                 fused: Optional[bool] = None, relative_bump: Optional[float] = None,
                 decay_horizon: str = "warmup", decay_floor: float = 0.1, total_steps: Optional[int] = None,
                 mask_rule: str = "additive", mask_bump_decay: Optional[int] = None,
                 lora_scale: Optional[float] = None, lora_scale_power: float = 0.0,
                 lora_scale_power_above: Optional[float] = None, max_warmup_steps: Optional[int] = None,
                 lr_growth: Optional[float] = None, lr_growth_max: float = 10.0,
                 lr_growth_steps: Optional[int] = None):
        defaults = dict(lr=lr, min_lr=min_lr, max_lr=max_lr, lr_bump=lr_bump, eta=eta, beta1=beta1,
                        d_coef=d_coef, weight_decay=weight_decay, warmup_steps=warmup_steps,
                        full_finetune=full_finetune, orthograd=orthograd,
                        stats_update_freq=stats_update_freq, sinkgd_iters=sinkgd_iters, grams=grams,
                        vradam=vradam, allora=allora, state_precision=state_precision, fused=fused,
                        foreach=foreach, mask_min_lr=min_lr, mask_max_lr=max_lr, relative_bump=relative_bump,
                        decay_horizon=decay_horizon, decay_floor=decay_floor, total_steps=total_steps,
                        mask_rule=mask_rule, mask_bump_decay=mask_bump_decay, lora_scale=lora_scale,
                        lora_scale_power=lora_scale_power, lora_scale_power_above=lora_scale_power_above,
                        lora_lr_factor=1.0, max_warmup_steps=max_warmup_steps, lr_growth=lr_growth,
                        lr_growth_max=lr_growth_max, lr_growth_steps=lr_growth_steps)
        self._validate(defaults, "")
        self._reset_caches()
        super().__init__(params, defaults)

    def _reset_caches(self) -> None:
        """Derived, rebuildable attributes (not saved: torch pickles only defaults, state and groups)."""
        self._generators: dict[torch.device, torch.Generator] = {}
        self._fused_gather: dict[int, list] = {}
        self._positions: dict[int, tuple[int, int]] = {}
        self._chunk_numel: Optional[int] = None
        self._stack_caches: dict[tuple, dict] = {}  # per bucket chunk, see _stacked_state
        self._stack_owner: dict[int, tuple] = {}  # parameter id -> the chunk whose stacks hold its state
        self._counts_cache: dict[int, tuple] = {}  # per group, see _element_counts
        self._workspaces: dict[tuple, Tensor] = {}  # a compact state's float32 loads, see _workspace
        self._replanned = False  # the decay re-planned for a new total_steps (warned once)

    def __getstate__(self) -> dict:
        pickled = super().__getstate__()
        signed_views = [(p, key, value.dtype) for p, entries in self.state.items()
                        for key, value in entries.items() if torch.is_tensor(value) and value.dtype in _UNPICKLABLE_AS]
        if signed_views:
            state = {p: dict(entries) for p, entries in self.state.items()}
            for p, key, dtype in signed_views:
                state[p][key] = state[p][key].view(_UNPICKLABLE_AS[dtype])
            pickled = {**pickled, "state": state, "_signed_views": signed_views}
        return pickled

    def __setstate__(self, state: dict) -> None:
        # Called by unpickling, copy.deepcopy and load_state_dict: caches are rebuilt, and groups
        # saved by older versions get the keys this version reads.
        state = dict(state)
        signed_views = state.pop("_signed_views", ())
        if signed_views:
            state["state"] = defaultdict(dict, state["state"])
        super().__setstate__(state)
        for p, key, dtype in signed_views:
            self.state[p][key] = self.state[p][key].view(dtype)
        self._reset_caches()
        self.defaults.setdefault("foreach", None)
        self.defaults.setdefault("mask_min_lr", self.defaults.get("min_lr"))
        self.defaults.setdefault("mask_max_lr", self.defaults.get("max_lr"))
        for group in self.param_groups:
            self._complete_group(group)

    @staticmethod
    def _complete_group(group: dict) -> None:
        """Keys the step reads that a group saved by an older version may lack."""
        group.setdefault("foreach", None)
        # Older versions kept the mask bounds under min_lr / max_lr.
        group.setdefault("mask_min_lr", group.get("min_lr"))
        group.setdefault("mask_max_lr", group.get("max_lr"))
        # The largest lr this group has seen: an outside scheduler can only lower the decay.
        group.setdefault("lr_max", _running_max(group.get("initial_lr", group["lr"]), group["lr"]))
        group.setdefault("group_step", 0)
        for key, value in _OPT_IN_DEFAULTS.items():  # saved before these existed: the document's step
            group.setdefault(key, value)
        device = group["params"][0].device if group["params"] else None
        for key in ("grad_abs_mean", "grad_abs_std"):
            if key in group and device is not None:
                group[key] = group[key].to(device)

    def add_param_group(self, param_group: dict) -> None:
        # A group's own min_lr / max_lr (as the user writes them) set its mask bounds.
        if isinstance(param_group, dict):
            for name in ("min_lr", "max_lr"):
                if name in param_group:
                    param_group.setdefault("mask_" + name, param_group[name])
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._validate(group, f" (param group {len(self.param_groups) - 1})")
        _warn_if_fused_is_not_used(group, f" (param group {len(self.param_groups) - 1})")
        self._apply_lora_scale(group)  # before _complete_group, which derives lr_max from the lr
        self._complete_group(group)
        self._chunk_numel = None  # recomputed from the new largest tensor at the next step

    @classmethod
    def _apply_lora_scale(cls, group: dict) -> None:
        """Scale a new group's learning rates by its lora_lr_factor, once (a resumed run loads
        the scaled values from its checkpoint and never comes through here)."""
        factor = lora_scale_lr_factor(group["lora_scale"], group["lora_scale_power"], group["lora_scale_power_above"])
        group["lora_lr_factor"] = factor
        if factor == 1.0:
            return
        for key in cls.LORA_SCALED + ("initial_lr", "mask_min_lr", "mask_max_lr"):
            if group.get(key) is not None:
                group[key] = group[key] * factor

    def _param_position(self, p: Tensor) -> tuple[int, int]:
        """(group index, index in group) of a parameter; cached, since the fused backward path
        asks once per parameter per step and a linear search would be quadratic."""
        if id(p) not in self._positions:
            self._positions = {id(q): (gi, i) for gi, g in enumerate(self.param_groups)
                               for i, q in enumerate(g["params"])}
        return self._positions[id(p)]

    # -- validation ---------------------------------------------------------------------------

    @staticmethod
    def _validate(settings: dict, where: str) -> None:
        get = settings.get
        # A group prepared by an LR scheduler holds its base in initial_lr (lr may be 0 in warm-up).
        lr = get("initial_lr", get("lr"))
        if torch.is_tensor(lr):
            if lr.numel() != 1:
                raise ValueError(f"Automagic_Sinkgd: lr{where}: Tensor lr must be 1-element (got shape "
                                 f"{tuple(lr.shape)}).")
            lr = lr.item()  # validation runs before training, where a host read is fine
        # The mask bounds; named min_lr / max_lr as the user passes them.
        min_lr, max_lr = get("mask_min_lr", get("min_lr")), get("mask_max_lr", get("max_lr"))
        _check_range("min_lr" + where, min_lr, min_lr >= 0, "min_lr >= 0")
        _check_range("max_lr" + where, max_lr, max_lr > 0 and max_lr >= min_lr,
                     f"max_lr > 0 and max_lr >= min_lr ({min_lr})")
        _check_range("lr" + where, lr, lr > 0, "lr > 0")
        hint = ""
        if lr >= 0.1:
            hint = (" Prodigy/D-Adaptation habits such as lr=1.0 do not apply: Automagic_Sinkgd takes a"
                    " real learning rate (the presets start at 1e-5 .. 5e-5).")
        _check_range("lr" + where, lr, min_lr <= lr <= max_lr, f"min_lr <= lr <= max_lr, i.e. [{min_lr}, {max_lr}]", hint)
        _check_range("lr_bump" + where, get("lr_bump"), get("lr_bump") >= 0, "lr_bump >= 0")
        _check_range("eta" + where, get("eta"), get("eta") > 0, "eta > 0")
        _check_range("beta1" + where, get("beta1"), 0 <= get("beta1") < 1, "0 <= beta1 < 1")
        _check_range("d_coef" + where, get("d_coef"), get("d_coef") >= 1, "d_coef >= 1 (1 disables it)")
        _check_range("weight_decay" + where, get("weight_decay"), get("weight_decay") >= 0, "weight_decay >= 0")
        warmup = get("warmup_steps")
        share = isinstance(warmup, float) and 0 < warmup < 1
        _check_range("warmup_steps" + where, warmup,
                     share or (isinstance(warmup, int) and not isinstance(warmup, bool) and warmup >= 1),
                     "an integer >= 1 (steps), or a number in (0, 1): that share of total_steps")
        _check_range("warmup_steps" + where, warmup, not share or get("total_steps") is not None,
                     "a share in (0, 1) together with total_steps (kohya's max_train_steps), or an integer >= 1")
        cap = get("max_warmup_steps")
        _check_range("max_warmup_steps" + where, cap,
                     cap is None or (isinstance(cap, int) and not isinstance(cap, bool) and cap >= 1),
                     "None or an integer >= 1 (the longest warm-up, in steps)")
        growth = get("lr_growth")
        _check_range("lr_growth" + where, growth,
                     growth is None or (isinstance(growth, (int, float)) and not isinstance(growth, bool)
                                        and 0 < growth <= 10),
                     "None (off) or a number in (0, 10]: the per-tensor factor's growth per step at full "
                     "gradient-momentum agreement, in log units (the lora and high_performance presets: 1.0)")
        growth_max = get("lr_growth_max", 10.0)
        _check_range("lr_growth_max" + where, growth_max,
                     isinstance(growth_max, (int, float)) and not isinstance(growth_max, bool)
                     and 1 <= growth_max < math.inf,
                     "a number >= 1 (the largest factor lr_growth may reach)")
        growth_steps = get("lr_growth_steps")
        _check_range("lr_growth_steps" + where, growth_steps,
                     growth_steps is None or (isinstance(growth_steps, int) and not isinstance(growth_steps, bool)
                                              and growth_steps >= 1),
                     "None (all of warm-up) or an integer >= 1: the steps during which lr_growth adapts")
        freq = get("stats_update_freq")
        _check_range("stats_update_freq" + where, freq, isinstance(freq, int) and freq >= 1,
                     "an integer >= 1")
        iters = get("sinkgd_iters")
        _check_range("sinkgd_iters" + where, iters, iters is None or (isinstance(iters, int) and iters >= 0),
                     "None (4 for LoRA, 5 for full fine-tune) or an integer >= 0")
        for flag in ("full_finetune", "orthograd", "grams", "vradam", "allora"):
            _check_range(flag + where, get(flag), isinstance(get(flag), bool), "True or False")
        fused = get("fused")
        _check_range("fused" + where, fused, fused is None or isinstance(fused, bool), "None, True or False")
        precision = get("state_precision")
        _check_range("state_precision" + where, precision, precision in STATE_PRECISIONS,
                     " or ".join(repr(p) for p in STATE_PRECISIONS))
        _check_range("foreach" + where, get("foreach"), get("foreach") is None or isinstance(get("foreach"), bool),
                     "None, True or False")
        rel = get("relative_bump")
        _check_range("relative_bump" + where, rel,
                     rel is None or (isinstance(rel, (int, float)) and not isinstance(rel, bool) and 0 <= rel <= 1),
                     "None (use lr_bump) or a number in [0, 1]: one mask move as a fraction of the group's lr")
        # the compact additive mask is a lattice of lr_bump steps: give it that bump as lr_bump instead
        _check_range("relative_bump" + where, rel,
                     rel is None or get("state_precision", "fp32") == "fp32" or get("mask_rule") == "multiplicative",
                     "None with state_precision other than 'fp32' (set lr_bump = relative_bump x lr instead), "
                     "unless mask_rule='multiplicative'")
        floor = get("decay_floor")
        _check_range("decay_floor" + where, floor,
                     isinstance(floor, (int, float)) and not isinstance(floor, bool) and 0 <= floor <= 1,
                     "a number in [0, 1] (0.1 in the document; 1 = no decay)")
        total = get("total_steps")
        _check_range("total_steps" + where, total,
                     total is None or (isinstance(total, int) and not isinstance(total, bool) and total >= 1),
                     "None or an integer >= 1 (the run's planned optimizer steps)")
        rule = get("mask_rule", "additive")
        _check_range("mask_rule" + where, rule, rule in MASK_RULES, " or ".join(repr(r) for r in MASK_RULES))
        if rule == "multiplicative":
            _check_range("relative_bump" + where, rel, rel is not None and rel > 0,
                         "a number in (0, 1] with mask_rule='multiplicative': one move multiplies the "
                         "element's lr by 1 + relative_bump (e.g. 0.05)")
        if precision != "fp32":
            _check_group_lattice(get, where)
        decay_after = get("mask_bump_decay")
        _check_range("mask_bump_decay" + where, decay_after,
                     decay_after is None or (isinstance(decay_after, int) and not isinstance(decay_after, bool)
                                             and decay_after >= 1 and rule == "multiplicative"),
                     "None, or an integer >= 1 (steps of full-size moves) with mask_rule='multiplicative'")
        scale, power = get("lora_scale"), get("lora_scale_power", 0.0)
        _check_range("lora_scale" + where, scale,
                     scale is None or (isinstance(scale, (int, float)) and not isinstance(scale, bool)
                                       and 0 < scale < math.inf),
                     "None or a number > 0: the LoRA's alpha / rank (kohya's network_alpha / network_dim)")
        _check_range("lora_scale_power" + where, power,
                     isinstance(power, (int, float)) and not isinstance(power, bool) and 0 <= power <= 1,
                     "a number in [0, 1] (0 keeps the lrs as given, 1 divides them by alpha / rank)")
        above = get("lora_scale_power_above")
        _check_range("lora_scale_power_above" + where, above,
                     above is None or (isinstance(above, (int, float)) and not isinstance(above, bool)
                                       and 0 <= above <= 1),
                     "None (= lora_scale_power) or a number in [0, 1]")
        for name, value in (("lora_scale_power", power), ("lora_scale_power_above", above)):
            _check_range(name + where, value, not value or scale is not None,
                         "0 without lora_scale; a power > 0 needs lora_scale = network_alpha / network_dim "
                         "(the kohya hook passes it on LoRA trainers; a full fine-tune has none)")
        horizon = get("decay_horizon")
        _check_range("decay_horizon" + where, horizon, horizon in ("warmup", "run"), "'warmup' or 'run'")
        _check_range("decay_horizon" + where, horizon, horizon != "run" or total is not None,
                     "'warmup', or 'run' together with total_steps (kohya's max_train_steps)")

    # -- state --------------------------------------------------------------------------------

    def _init_state(self, p: Tensor, group: dict) -> dict:
        if group["state_precision"] != "fp32":
            return self._init_compact_state(p, group)
        state = self.state[p]
        state_dtype = torch.promote_types(p.dtype, torch.float32)
        warmup = _planned_warmup(group)
        # The mask starts at the group's base lr: kohya's schedulers with warm-up put 0 into
        # group["lr"] at step 0 and keep the base in "initial_lr".
        start_lr = _start_lr(group.get("initial_lr", group["lr"]))
        state["step"] = 0
        # Dense, whatever the parameter's layout (channels_last, transposed): the step views each
        # state tensor as its matrix, in place, which only a contiguous tensor allows.
        state["exp_avg"] = torch.zeros_like(p, dtype=state_dtype, memory_format=torch.contiguous_format)
        state["lr_mask"] = torch.empty_like(p, dtype=state_dtype, memory_format=torch.contiguous_format).fill_(start_lr)
        state["avg_lr"] = torch.empty((), dtype=state_dtype, device=p.device).fill_(start_lr)
        state["avg_lr_max"] = torch.empty((), dtype=state_dtype, device=p.device).fill_(start_lr)
        if warmup > 1:
            state["polarity"] = torch.zeros_like(p, dtype=torch.bool, memory_format=torch.contiguous_format)
        if group["d_coef"] != 1 and 1 < warmup / 2:
            state["initial_weight"] = p.detach().clone(memory_format=torch.contiguous_format)
        if p.ndim >= 2 and not group["full_finetune"] and group["allora"]:
            state["row_scaling"] = allora_row_scaling(_as_matrix_view(p.detach()).unsqueeze(0),
                                                      group["eta"]).squeeze(0).to(state_dtype)
        return state

    def _init_compact_state(self, p: Tensor, group: dict) -> dict:
        """The layout of ``state_precision="bf16"`` (see the class docstring); per-tensor scalars
        stay float32."""
        state = self.state[p]
        warmup = _planned_warmup(group)
        start_lr = _start_lr(group.get("initial_lr", group["lr"]))
        codec = _group_mask_codec(group)
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p, dtype=torch.bfloat16, memory_format=torch.contiguous_format)
        state["lr_mask"] = torch.empty_like(p, dtype=torch.uint16, memory_format=torch.contiguous_format).fill_(
            _encode_lr_mask_scalar(start_lr, codec))
        state["lr_mask_codec"] = codec
        state["avg_lr"] = torch.empty((), dtype=torch.float32, device=p.device).fill_(start_lr)
        state["avg_lr_max"] = torch.empty((), dtype=torch.float32, device=p.device).fill_(start_lr)
        if warmup > 1:
            state["polarity"] = torch.zeros(((p.numel() + 7) // 8,), dtype=torch.uint8, device=p.device)
        if group["d_coef"] != 1 and 1 < warmup / 2:
            x0_dtype = p.dtype if p.element_size() <= 2 else torch.bfloat16
            state["initial_weight"] = p.detach().to(dtype=x0_dtype, memory_format=torch.contiguous_format, copy=True)
        if p.ndim >= 2 and not group["full_finetune"] and group["allora"]:
            state["row_scaling"] = allora_row_scaling(_as_matrix_view(p.detach()).unsqueeze(0),
                                                      group["eta"]).squeeze(0).float()
        return state

    def _rebase_lr_mask(self, state: dict, group: dict) -> None:
        """Re-encode a compact mask when min_lr, max_lr or lr_bump changed (they are read from the
        group at every step): decode on the old lattice, clamp, encode on the new one."""
        codec = _group_mask_codec(group)
        if state["lr_mask_codec"] != codec:
            mask = decode_lr_mask(state["lr_mask"], state["lr_mask_codec"]).clamp_(group["mask_min_lr"], group["mask_max_lr"])
            encode_lr_mask_(state["lr_mask"], mask, codec)
            state["lr_mask_codec"] = codec

    @staticmethod
    def _warmup_of(state: dict, group: dict) -> int:
        """This tensor's warm-up in steps: the planned one, or, once it has ended, the length it
        ended at. A resumed run with a longer total_steps moves a share-based warm-up's end, but
        a warm-up that has ended has freed its sign history: it must stay ended."""
        ended = state.get("warmup_ended")
        return ended if ended is not None else _planned_warmup(group)

    def _advance_phase(self, state: dict, group: dict) -> int:
        """Advance the tensor's own step counter; free state its next phases no longer need."""
        state["step"] += 1
        t = state["step"]
        if "lr_decay" in state and "warmup_ended" not in state:  # saved before the end was recorded
            state["warmup_ended"] = min(_planned_warmup(group), t - 1)
        warmup = self._warmup_of(state, group)
        freed = False
        if t >= warmup / 2:
            freed = state.pop("initial_weight", None) is not None
        if t >= warmup:
            freed |= state.pop("polarity", None) is not None
        if freed:
            self._stack_caches.clear()  # they would keep the freed buffers alive
            self._stack_owner.clear()
        if t < warmup and "lr_mask_codec" in state:
            self._rebase_lr_mask(state, group)
        if group["lr_growth"] and "lr_growth" not in state:  # a first step, or switched on mid-run: from 1
            state["lr_growth"] = torch.ones_like(state["avg_lr"])
        if t >= warmup:
            if "lr_decay" not in state:
                state["decay_rate"] = post_warmup_decay_rate(state["avg_lr"], state["avg_lr_max"], warmup,
                                                             group["decay_horizon"], group["total_steps"])
                state["lr_decay"] = torch.ones_like(state["avg_lr"])
                state["warmup_ended"] = warmup
                state["decay_total"] = group["total_steps"]
            elif group["decay_horizon"] == "run" and state.get("decay_total") != group["total_steps"]:
                self._replan_decay(state, group, t, warmup)
        return t

    def _replan_decay(self, state: dict, group: dict, t: int, warmup: int) -> None:
        """A run extended (or shortened) on resume: the decay over the rest of the run follows the
        new total_steps, as if the run had been planned at that length from the end of warm-up
        (kohya's own schedulers follow a new --max_train_steps the same way). In place, so the
        stacked views of the state stay valid."""
        rate = post_warmup_decay_rate(state["avg_lr"], state["avg_lr_max"], warmup, "run", group["total_steps"])
        state["decay_rate"].copy_(rate)
        state["lr_decay"].copy_(1.0 - rate * (t - warmup))  # where the new plan stands before this step
        if not self._replanned:
            import warnings
            warnings.warn(f"Automagic_Sinkgd: total_steps changed from {state.get('decay_total')} to "
                          f"{group['total_steps']} after warm-up: the post-warm-up decay now ends at step "
                          f"{group['total_steps']}.", RuntimeWarning, stacklevel=2)
            self._replanned = True
        state["decay_total"] = group["total_steps"]

    def _workspace(self, name: str, shape: tuple, dtype: torch.dtype, device: torch.device) -> Tensor:
        """A buffer kept between steps for a compact state's float32 load,
        grown to the largest bucket chunk: on CPU a fresh allocation of a large tensor costs a
        page fault per 4 KB, more than the step's own arithmetic on it. Contents are scratch."""
        buffers = self._workspaces
        numel = math.prod(shape)
        buffer = buffers.get((name, dtype, device))
        if buffer is None or buffer.numel() < numel:
            buffer = buffers[(name, dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
        return buffer[:numel].view(shape)

    def _generator_for(self, like: Tensor, seed: int) -> torch.Generator:
        generator = self._generators.get(like.device)
        if generator is None:
            generator = self._generators[like.device] = torch.Generator(device=like.device)
        return generator.manual_seed(seed)

    @staticmethod
    def _rounding_seed(group_index: int, param_index: int, t: int, stream: int = 0) -> int:
        """A seed from (tensor, step) alone: replicas agree, and a resumed run rounds identically.
        ``stream`` 0 rounds the weights, 1 the momentum of a compact state."""
        return ((group_index * 1_000_003 + param_index) * 2_654_435_761 + t * 97_531
                + stream * 0x2545_F491_4F6C) & 0x7FFF_FFFF_FFFF

    # -- group statistics -----------------------------------------------------------------------

    @staticmethod
    def _stats_due(group: dict) -> bool:
        return (group["group_step"] - 1) % group["stats_update_freq"] == 0

    @staticmethod
    def _finite_sums(abs_sums: Tensor, norms: Tensor, counts: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-tensor |g| sums, L2 norms and element counts -> group sums over the finite tensors
        only, so one NaN gradient cannot poison the statistics (and through them every decay)."""
        finite = torch.isfinite(abs_sums) & torch.isfinite(norms)
        zero = abs_sums.new_zeros((), dtype=torch.float64)
        return (torch.where(finite, abs_sums.double(), zero).sum(),
                torch.where(finite, norms.double().square(), zero).sum(),
                torch.where(finite, counts, zero).sum())

    @staticmethod
    def _store_stats(group: dict, abs_sum: Tensor, sq_sum: Tensor, count: Tensor) -> None:
        """mean and population std of |g| over every gradient element of the group, from sums:
        no concatenation of gradients (that would copy all of them)."""
        count = count.clamp_min(1.0)
        mean = abs_sum / count
        var = (sq_sum / count - mean * mean).clamp_min(0.0)
        group["grad_abs_mean"] = mean.float()
        group["grad_abs_std"] = var.sqrt().float()

    def _element_counts(self, group_index: int, grads: list[Tensor]) -> Tensor:
        """Each gradient's element count, as float64 on the device, kept until the set changes.

        Built with one fill per tensor (from the host's ints, a fill needs no host-to-device copy,
        which would wait for the device), so it is worth building once rather than every refresh.
        """
        numels = tuple(g.numel() for g in grads)
        device = grads[0].device
        cached = self._counts_cache.get(group_index)
        if cached is None or cached[0] != numels or cached[1].device != device:
            counts = torch.stack([torch.full((), n, dtype=torch.float64, device=device) for n in numels])
            cached = self._counts_cache[group_index] = (numels, counts)
        return cached[1]

    def _refresh_group_stats(self, group_index: int, group: dict, grads: list[Tensor]) -> None:
        sums = self._finite_sums(torch.stack(torch._foreach_norm(grads, 1)),
                                 torch.stack(torch._foreach_norm(grads, 2)),
                                 self._element_counts(group_index, grads))
        self._store_stats(group, *sums)

    @staticmethod
    def _group_stats(group: dict) -> Optional[tuple]:
        if "grad_abs_mean" not in group:
            return None
        return group["grad_abs_mean"], group["grad_abs_std"]

    # -- step -----------------------------------------------------------------------------------

    @staticmethod
    def _resolved(group: dict) -> dict:
        """Group settings with sinkgd_iters resolved from the mode (4 for LoRA, 5 for full) and
        lr_bump from relative_bump when that is set."""
        if group["sinkgd_iters"] is None:
            group = {**group, "sinkgd_iters": 5 if group["full_finetune"] else 4}
        if group["relative_bump"] is not None:
            if group["mask_rule"] == "multiplicative":  # a move of log(1 + relative_bump) in log(lr)
                lattice = _group_mask_codec(group)[1] if group["state_precision"] != "fp32" else 0.0
                move = annealed_log_bump(math.log1p(group["relative_bump"]), group["mask_bump_decay"],
                                         group["group_step"], lattice)
                group = {**group, "lr_bump": move}
            else:
                base_lr = group.get("initial_lr", group["lr"])
                group = {**group, "lr_bump": relative_lr_bump(group["lr_bump"], group["relative_bump"], base_lr)}
        return group

    @staticmethod
    def _check_grad(p: Tensor) -> Tensor:
        grad = p.grad
        if grad.is_sparse:
            raise RuntimeError("Automagic_Sinkgd does not support sparse gradients; use dense parameters "
                               "(e.g. nn.Embedding(sparse=False)).")
        if grad.is_complex() or p.is_complex():
            raise RuntimeError("Automagic_Sinkgd does not support complex parameters or gradients.")
        return grad

    # Under torch.compile the step runs eagerly (a graph break): its phases come from Python step
    # counters, which would make every step's graph a new one (a recompile per step until dynamo
    # gives up). The step itself traces (no data_ptr or host reads), for code that compiles it.
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group_index, group in enumerate(self.param_groups):
            # A size-0 tensor has nothing to update (its mask mean would be NaN): it gets no state.
            entries = [(i, p) for i, p in enumerate(group["params"]) if p.grad is not None and p.numel()]
            if not entries:
                continue
            group["lr_max"] = _running_max(group["lr_max"], group["lr"])
            group["group_step"] += 1
            settings = self._resolved(group)
            grads = [self._check_grad(p) for _, p in entries]
            buckets: dict[tuple, list] = {}
            needs_stats = False
            for (index, p), grad in zip(entries, grads):
                state = self.state[p] if self.state[p] else self._init_state(p, group)
                t = self._advance_phase(state, group)
                is_matrix = p.ndim >= 2
                phase = _Phase(t, self._warmup_of(state, group), group["orthograd"], is_matrix,
                               group["lr_growth_steps"])
                needs_stats |= phase.early and group["weight_decay"] > 0
                key = (_matrix_shape(p.shape), p.dtype, p.device, phase.key(),
                       "row_scaling" in state, "initial_weight" in state, "polarity" in state,
                       "lr_growth" in state)
                buckets.setdefault(key, []).append((index, p, grad, state, phase, is_matrix))
            if needs_stats and (self._stats_due(group) or "grad_abs_mean" not in group):
                self._refresh_group_stats(group_index, group, grads)
            stats = self._group_stats(group)
            vectors: dict[tuple, list] = {}
            eager: list[list] = []  # chunks the eager step takes, stepped after the fused ones
            for key, members in buckets.items():
                kernels = self._fused_kernels_for(members, settings)
                if kernels is not None and members[0][1].numel() <= kernels._SPLIT_NUMEL:
                    # one launch for the whole bucket: tables of addresses, no stacked copies of
                    # gradients or weights, so no chunks (the kernels bound their own buffers)
                    self._run_bucket(members, settings, stats, group_index)
                    continue
                if (kernels is None and not members[0][5] and group["foreach"] is not False
                        and _launch_bound(members[0][1].device)):
                    vectors.setdefault(key[1:], []).extend(members)  # stepped below, all lengths together
                    continue
                if kernels is not None:
                    # Large tensors the split kernels step are chunked by their own buffers (a
                    # chunk costs 2 + sinkgd_iters launches and stacks no gradients).
                    for chunk in self._chunks(members, group["foreach"],
                                              kernels.split_chunk_numel(_matrix_shape(members[0][1].shape))):
                        self._run_bucket(chunk, settings, stats, group_index)
                    continue
                eager.extend(self._chunks(members, group["foreach"]))
            for members in vectors.values():
                eager.extend(_padded_vector_chunks(members, _GPU_CHUNK_NUMEL))
            for chunk, finite in zip(eager, self._finite_flags_of(eager) if group["foreach"] is not False
                                     else [None] * len(eager)):
                self._run_bucket(chunk, settings, stats, group_index, finite)
        return loss

    @staticmethod
    def _finite_flags_of(chunks: list[list]) -> Iterable[Optional[Tensor]]:
        """Each eager chunk's finite test (B,), made for all of them at once where launches are the
        cost (``finite_flags``, per device); elsewhere None, each chunk tests its own stack."""
        flags: list[Optional[Tensor]] = [None] * len(chunks)
        by_device: dict[torch.device, list[int]] = {}
        for position, chunk in enumerate(chunks):
            if _launch_bound(chunk[0][1].device) and all(m[2].dtype in _FLAGGED_DTYPES for m in chunk):
                by_device.setdefault(chunk[0][1].device, []).append(position)
        for positions in by_device.values():
            together = finite_flags([m[2] for position in positions for m in chunks[position]])
            for position, finite in zip(positions, together.split([len(chunks[p]) for p in positions])):
                flags[position] = finite
        return flags

    @staticmethod
    def _fused_kernels_for(members: list, settings: dict):
        """The fused kernels module when it will step this bucket (from t = 2, foreach not False, a
        layout and alignment it takes; host checks only), else None: the eager step runs."""
        if not _fused_phase(settings, members[0][4]) or settings["foreach"] is False:
            return None
        kernels = _fused_kernels()
        if kernels is None or not kernels.takes_bucket(
                [m[1] for m in members], [m[2] for m in members], [m[3] for m in members], settings):
            return None
        return kernels

    def _chunks(self, members: list, foreach: Optional[bool], limit: Optional[int] = None) -> Iterable[list]:
        """Split a bucket so a stacked copy is no larger than the largest tensor (or a small floor;
        ``limit`` elements when given); foreach=False steps tensors one by one."""
        if foreach is False:
            for member in members:
                yield [member]
            return
        if self._chunk_numel is None:
            largest = max([0] + [p.numel() for g in self.param_groups for p in g["params"]])
            self._chunk_numel = min(max(largest, _MIN_CHUNK_NUMEL), _MAX_CHUNK_NUMEL)
        numel = members[0][1].numel()
        if limit is None:
            limit = _GPU_CHUNK_NUMEL if _launch_bound(members[0][1].device) else self._chunk_numel
        per_chunk = max(1, limit // max(numel, 1))
        for start in range(0, len(members), per_chunk):
            yield members[start:start + per_chunk]

    def _stack_cache_for(self, chunk: list) -> dict:
        """The stacked-state cache of this chunk. A tensor belongs to one chunk's stacks at a time:
        when it moves (the eager first step's chunks, then the fused step's whole bucket; a
        bucket that changed members), the caches it was in are dropped, so they stop holding a
        second copy of its state."""
        key = (id(chunk[0][1]), len(chunk))
        for member in chunk:
            previous = self._stack_owner.get(id(member[1]))
            if previous != key:
                if previous is not None:
                    self._stack_caches.pop(previous, None)
                self._stack_owner[id(member[1])] = key
        return self._stack_caches.setdefault(key, {})

    def _run_bucket(self, chunk: list, settings: dict, stats: Optional[tuple], group_index: int,
                    finite: Optional[Tensor] = None) -> None:
        _, _, _, _, phase, is_matrix = chunk[0]
        # Per tensor, so a bf16 tensor rounds the same stepped alone (step_param) or in any stack
        # (fp16 weights round from a generator seeded by a chunk's first tensor).
        weight_seeds = ([self._rounding_seed(group_index, m[0], m[3]["step"]) for m in chunk]
                        if chunk[0][1].element_size() == 2 else [])  # only 16-bit weights are rounded
        state_seeds = None
        if settings["state_precision"] != "fp32":
            state_seeds = [self._rounding_seed(group_index, m[0], m[3]["step"], stream=1) for m in chunk]
        _step_bucket(params=[m[1] for m in chunk], grads=[m[2] for m in chunk], states=[m[3] for m in chunk],
                     group=settings, phase=phase, is_matrix=is_matrix,
                     group_stats=stats, generator_for=self._generator_for, weight_seeds=weight_seeds,
                     stack_cache=self._stack_cache_for(chunk),
                     state_seeds=state_seeds, workspace=self._workspace if state_seeds is not None else None,
                     finite=finite)

    @torch.no_grad()
    def step_param(self, p: Tensor, group: dict) -> None:
        """Step one parameter from its gradient hook (kohya ``--fused_backward_pass``).

        Group statistics cannot be computed before the step when gradients arrive one at a time,
        so they come from |g| sums gathered while the previous stats step ran (the first stats
        step uses theta = 1, the neutral value, as no statistics exist yet).
        """
        if p.grad is None or not p.numel():
            return
        grad = self._check_grad(p)
        group_index, index = self._param_position(p)
        # Hooks registered before a resume hold the old group dict; the live one has the loaded state.
        group = self.param_groups[group_index]
        state = self.state[p] if self.state[p] else self._init_state(p, group)
        t = self._advance_phase(state, group)
        gather = self._fused_gather.setdefault(group_index, [0, None, None, None])  # step, |g| sum, g^2 sum, n
        if t > group["group_step"]:
            # The first tensor of a new step closes the previous step's gathering.
            if gather[1] is not None:
                self._store_stats(group, gather[1], gather[2], gather[3])
            group["group_step"] = t
            group["lr_max"] = _running_max(group["lr_max"], group["lr"])
            gather[:] = [t, None, None, None]
        phase = _Phase(t, self._warmup_of(state, group), group["orthograd"], p.ndim >= 2, group["lr_growth_steps"])
        if phase.early and group["weight_decay"] > 0 and self._stats_due(group):
            flat = grad.reshape(-1)
            sums = self._finite_sums(torch.linalg.vector_norm(flat, 1).view(1),
                                     torch.linalg.vector_norm(flat, 2).view(1),
                                     torch.full((1,), flat.numel(), dtype=torch.float64, device=flat.device))
            gather[1:] = sums if gather[1] is None else [a + b for a, b in zip(gather[1:], sums)]
        self._run_bucket([(index, p, grad, state, phase, p.ndim >= 2)], self._resolved(group),
                         self._group_stats(group), group_index)

    # -- monitoring -----------------------------------------------------------------------------

    @torch.no_grad()
    def effective_lrs(self) -> list[Tensor]:
        """Average effective learning rate of each group, element-weighted, as 0-d tensors.

        Computed from the state on demand, so reading it only on logged steps costs nothing on
        the others; it stays on the device until the caller converts it.
        """
        results = []
        for group in self.param_groups:
            total, count = None, 0
            lr_ratio = group["lr"] / group["lr_max"] if group["lr_max"] > 0 else 1.0
            for p in group["params"]:
                state = self.state.get(p)
                if not state or "avg_lr" not in state:
                    continue
                lr = state["avg_lr"]
                if "lr_decay" in state:
                    lr = lr * post_warmup_decay(state["lr_decay"], lr_ratio, group["decay_floor"])
                if group["vradam"]:
                    momentum = state["exp_avg"]
                    momentum = momentum.to(torch.promote_types(momentum.dtype, torch.float32))
                    lr = lr * vradam_brake(momentum.reshape(1, -1))[0]
                if "row_scaling" in state:
                    lr = lr * state["row_scaling"].mean()
                if group["lr_growth"] and "lr_growth" in state:
                    lr = lr * state["lr_growth"]
                total = lr * p.numel() if total is None else total + lr * p.numel()
                count += p.numel()
            if total is None:
                base = group.get("initial_lr", group["lr"])
                results.append(torch.tensor(float(base)))
            else:
                results.append(total / count)
        return results

    # -- resume ---------------------------------------------------------------------------------

    @staticmethod
    def _convert_state_precision(state: dict, p: Tensor, group: dict) -> None:
        """Bring one tensor's state to the group's state_precision, if it was saved in the other.

        fp32 -> bf16: momentum and x0 rounded to nearest, mask onto the lattice (within half a
        step), signs packed. bf16 -> fp32: momentum, x0 and signs exact, mask decoded.
        """
        compact_now = "lr_mask_codec" in state  # kept with a compact state only
        compact_wanted = group["state_precision"] != "fp32"
        if compact_now == compact_wanted:
            return
        numel = p.numel()
        if compact_wanted:
            codec = _group_mask_codec(group)
            mask = state["lr_mask"].to(torch.float32, copy=True)
            state["exp_avg"] = state["exp_avg"].to(torch.bfloat16).contiguous()
            mask.clamp_(group["mask_min_lr"], group["mask_max_lr"])
            state["lr_mask"] = encode_lr_mask_(torch.empty(p.shape, dtype=torch.uint16, device=p.device),
                                               mask, codec)
            state["lr_mask_codec"] = codec
            if "polarity" in state:
                packed = torch.empty(((numel + 7) // 8,), dtype=torch.uint8, device=p.device)
                bits = _as_matrix_view(state["polarity"]).reshape(1, numel).to(torch.uint8)
                state["polarity"] = pack_bits_(packed.view(1, -1), bits).view(-1)
            if "initial_weight" in state and state["initial_weight"].element_size() > 2:
                state["initial_weight"] = state["initial_weight"].to(torch.bfloat16).contiguous()
            float_dtype = torch.float32
        else:
            float_dtype = torch.promote_types(p.dtype, torch.float32)
            state["exp_avg"] = state["exp_avg"].to(float_dtype)
            state["lr_mask"] = decode_lr_mask(state["lr_mask"], state.pop("lr_mask_codec"), float_dtype)
            if "polarity" in state:
                bits = unpack_bits(state["polarity"].view(1, -1), numel)
                state["polarity"] = bits.reshape(p.shape).to(torch.bool)
            if "initial_weight" in state:
                state["initial_weight"] = state["initial_weight"].to(p.dtype)
        for key in ("avg_lr", "avg_lr_max", "lr_decay", "decay_rate", "row_scaling", "lr_growth"):
            if key in state:
                state[key] = state[key].to(float_dtype)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state_dict, keeping every state tensor in the dtype it was saved in, and owning
        it (never aliasing the caller's tensors).

        torch's default casts floating state (and even bool) to the parameter's dtype, which would
        turn the float32 mask and momentum of bf16 weights into bf16, and keeps the caller's very
        tensors where no cast is needed. The fix-up runs inside torch's own sequence: it reads the
        dict the user's pre-hooks produced (its hook runs after theirs) and writes the state
        before the user's post-hooks run (its hook runs first), so both see and keep their changes.

        The settings in ``KEPT_ON_LOAD`` choose how the step is stored and run, not what it
        computes, so this optimizer's own values win over the saved ones (every other setting is
        the saved one, as in torch): a state saved in another precision is converted (see
        ``_convert_state_precision``). A resume in the precision it was saved in continues bit
        for bit.
        """
        configured = [{key: g[key] for key in self.KEPT_ON_LOAD} for g in self.param_groups]
        final: dict = {}

        def keep_final_dict(optimizer, loaded):
            final["state_dict"] = loaded
            for index, (saved, settings) in enumerate(zip(loaded["param_groups"], configured)):
                if settings["state_precision"] != "fp32":  # the saved bounds and lr_bump meet a 16-bit mask
                    _check_group_lattice(saved.get, f" (param group {index} of the loaded state)")

        def restore_saved_tensors(optimizer):
            optimizer._own_loaded_state(final["state_dict"], configured)

        handles = (self.register_load_state_dict_pre_hook(keep_final_dict),
                   self.register_load_state_dict_post_hook(restore_saved_tensors, prepend=True))
        try:
            super().load_state_dict(state_dict)
        finally:
            for handle in handles:
                handle.remove()

    def _own_loaded_state(self, loaded: dict, configured: list[dict]) -> None:
        saved_ids = [i for g in loaded["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for saved_id, p in zip(saved_ids, params):
            state = self.state.get(p)
            if not state:
                continue
            for key, saved in loaded["state"].get(saved_id, {}).items():
                current = state.get(key)
                if torch.is_tensor(saved) and torch.is_tensor(current) and (
                        current is saved or current.dtype != saved.dtype):
                    state[key] = saved.to(device=p.device, copy=True)
        for group, settings in zip(self.param_groups, configured):
            group.update(settings)
            for p in group["params"]:
                if self.state.get(p):
                    self._convert_state_precision(self.state[p], p, group)
