"""Fused Triton kernels for the Automagic_Sinkgd step (opt-in: ``Automagic_Sinkgd(..., fused=True)``).

One launch steps a whole bucket of same-shape tensors: gradients and weights are read and written
where they are, through tables of their addresses, and the state is the optimizer's stacks (fp32,
or the compact ``state_precision="bf16"`` layout). One program walks a tensor's matrix in tiles,
so a small LoRA matrix (16 x 320 .. 16 x 10240) stays in the L2 cache across the passes SinkGD
needs and the per-tensor scalars (finite flag, Prodigy signal, VRAdam brake, mask mean, decay)
never leave the program; a few programs loop over the bucket's tensors, each with its own slot
of a bounded U buffer. A large (full fine-tune) matrix is split into blocks of rows, one program
each, over 2 + sinkgd_iters launches per chunk of same-shape tensors: no U buffer (each pass
computes U again from the gradient, the momentum before the step and the weights, all unchanged
until the last launch writes the momentum and the weights), and each launch's row blocks leave
partial column sums that the next launch adds up in a fixed order (see _split_launches).

The math is the eager path's (``library.automagic_sinkgd._bucket_math``, the reference), in the
same order; ``tests/test_fused_kernels.py`` compares the two in every phase. Passes per program:
  0. reductions over the raw gradient (finite flag, mean |g|), <g, x0 - x> and OrthoGrad's dots
     (the split path: also lr_growth's sign agreement, see _split_state_kernel);
  1. elementwise: Grams direction (+ OrthoGrad projection) written to the U buffer, momentum,
     sign history and mask; reductions: ||m||^2, mask mean, the first SinkGD row sums of U**2,
     the opt-in lr_growth's sign agreement of g and the momentum before the step;
  2. SinkGD: 2 * iters - 1 more mat-vec passes over U**2 (per-row / per-column scalings kept in
     two small per-tensor buffers; the split path does a column and a row half-step per launch);
  3. epilogue: weight decay and w -= mask * diag(r) U diag(c), with stochastic rounding for bf16.

This module is imported only when a bucket asks for the fused step; it raises ImportError when
Triton is missing, which the optimizer turns into the eager step. On CPU tensors the kernels run
only under Triton's interpreter (``TRITON_INTERPRET=1`` set before this module is imported), which
the tests use; otherwise CPU buckets take the eager step.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from library import automagic_sinkgd as core

_FLOAT32_TINY = 1.1754943508222875e-38  # torch.finfo(torch.float32).tiny, the eager path's floor
_NUM_WARPS = 4
# An explicit register cap at the hardware's 255: without one, ptxas (Triton 3.9's) trades
# registers for occupancy and spills 8-48 bytes in ~1 in 4 variants at 64-140 registers; with it
# none spills and the most any variant takes stays under the check's margin (compile_kernels.py).
_MAX_NREG = 255
# One program per tensor uses one SM: a tensor larger than this (full fine-tune matrices; LoRA
# matrices, up to 16 x 10240, stay below it) is split into blocks of rows, one program each (see
# split_row_blocks), over 2 + sinkgd_iters launches.
_SPLIT_NUMEL = 1 << 18
# Float32 buffers of one chunk of split tensors (row scalings, partial column sums): 64 MB at most,
# half the U buffer the split path had before it recomputed U (an SDXL full step: 31 chunks).
_SPLIT_BUFFER_NUMEL = 1 << 24
# Per-block partial sums of the split path, (tensors, blocks, _PARTIALS) float32: total, |g|,
# Prodigy signal, OrthoGrad's <u, x>, |x|^2, |u|^2 (launch 1); |m|^2, mask sum, |u|^2 after (launch 2);
# the sum of sign(g) x sign(m) of the opt-in lr_growth (launch 1).
_PARTIALS: tl.constexpr = tl.constexpr(10)
_BLOCK_SUM_WIDTH = 128  # blocks summed side by side by _block_sum


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (set before the first import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ----------------------------------------------------------------------------------------------
# Device helpers, one per technique; scalars are 0-d values of one program.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _finite_or_zero(g):
    """NaN and +-Inf to 0 (x - x is 0 only for finite x; libdevice.isnan is not in the interpreter)."""
    return tl.where(g - g == 0.0, g, 0.0)


@triton.jit
def _grams_direction(g, m, IS_MATRIX: tl.constexpr, GRAMS: tl.constexpr):
    """Grams (arXiv 2412.17107): |m| * sign(g + m) for matrices, |m| * sign(g) for vectors."""
    if GRAMS:
        if IS_MATRIX:
            u = tl.where(g + m < 0.0, -tl.abs(m), tl.abs(m))
        else:
            u = tl.abs(m) * tl.where(g > 0.0, 1.0, tl.where(g < 0.0, -1.0, 0.0))
    else:
        u = m
    return u


@triton.jit
def _direction_tile(grad_ptr, exp_avg_ptr, weight_ptr, offsets, local, inside, projection,
                    IS_MATRIX: tl.constexpr, GRAMS: tl.constexpr, ORTHO: tl.constexpr):
    """The gradient (NaN/Inf as 0), the momentum before this step and the direction U of one tile
    (Grams, minus OrthoGrad's projection on the weights): the same bits in every pass that computes
    it, so the split path recomputes U where the one-program kernel keeps it in its buffer."""
    g = _finite_or_zero(tl.load(grad_ptr + local, mask=inside, other=0.0).to(tl.float32))
    m = tl.load(exp_avg_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    u = _grams_direction(g, m, IS_MATRIX, GRAMS)  # from the momentum before this step (ADOPT)
    if ORTHO:
        w = tl.load(weight_ptr + local, mask=inside, other=0.0).to(tl.float32)
        u = u - w * projection
    return g, m, u


@triton.jit
def _sign_agreement(g, m):
    """sign(g x m): +1 where the gradient agrees with the momentum, -1 where not, 0 at a zero."""
    product = g * m
    return tl.where(product > 0.0, 1.0, tl.where(product < 0.0, -1.0, 0.0))


@triton.jit
def _grown_factor(growth, agreement, finite_f, growth_rate, growth_max):
    """``core.momentum_agreement_growth_`` of one tensor: its factor times exp(rate x mean
    agreement), in [1, growth_max]; a skipped tensor (finite_f 0) keeps its factor."""
    return tl.minimum(tl.maximum(growth * tl.exp(agreement * finite_f * growth_rate), 1.0), growth_max)


@triton.jit
def _momentum_step(g, m, lerp_weight):
    """ADOPT (arXiv 2411.02853) momentum, with torch.lerp's two-branch formula."""
    return tl.where(lerp_weight < 0.5, m + lerp_weight * (g - m), g - (g - m) * (1.0 - lerp_weight))


@triton.jit
def _store_momentum(exp_avg_ptr, offsets, local, inside, m, table_ptr, state_noise_offset, COMPACT: tl.constexpr):
    if COMPACT:
        tl.store(exp_avg_ptr + offsets, _round_to_bf16(m, table_ptr, state_noise_offset, local), mask=inside)
    else:
        tl.store(exp_avg_ptr + offsets, m, mask=inside)


@triton.jit
def _round_to_bf16(x, table_ptr, noise_offset, local):
    """Stochastic rounding (arXiv 1502.02551) of float32 ``x`` to bf16: 16 bits of noise from the
    rounding table below bf16's bits, then truncation (``core.stochastic_round_`` with
    ``core.add_rounding_noise_``: element ``local`` of a tensor whose noise starts at ``noise_offset``)."""
    noise = tl.load(table_ptr + ((local + noise_offset + (local >> 16) * 0x9E37) & 0xFFFF))  # core.noise_index
    bits = (x.to(tl.int32, bitcast=True) + noise) & -65536
    return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)


@triton.jit
def _load_lr_mask(lr_mask_ptr, offsets, inside, mask_anchor, mask_step, COMPACT: tl.constexpr):
    """The float32 mask; a compact state's 16-bit lattice code decoded (``core.decode_lr_mask``)."""
    if COMPACT:
        code = tl.load(lr_mask_ptr + offsets, mask=inside, other=0).to(tl.int32) & 0xFFFF
        mask = code.to(tl.float32) * mask_step + mask_anchor
    else:
        mask = tl.load(lr_mask_ptr + offsets, mask=inside, other=0.0)
    return mask


@triton.jit
def _tile(b, numel, r0, c0, R, C, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Offsets (into the stacked buffer) and in-bounds mask of one tile of tensor b."""
    rows = r0 + tl.arange(0, BLOCK_R)
    cols = c0 + tl.arange(0, BLOCK_C)
    inside = (rows[:, None] < R) & (cols[None, :] < C)
    offsets = b * numel + rows[:, None] * C + cols[None, :]
    return offsets, inside, rows, cols


@triton.jit
def _sinkgd_col_pass(scratch_ptr, row_sq_ptr, col_sq_ptr, b, numel, R, C, c_begin, c_end,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """SinkGD (arXiv 2502.06742) column half-step on U**2 for columns [c_begin, c_end):
    col_sq = 1 / max(row_sq @ U**2, tiny)."""
    for c0 in range(c_begin, c_end, BLOCK_C):
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            offsets, inside, rows, cols = _tile(b, numel, r0, c0, R, C, BLOCK_R, BLOCK_C)
            inside = inside & (cols[None, :] < c_end)
            u = tl.load(scratch_ptr + offsets, mask=inside, other=0.0)
            r_sq = tl.load(row_sq_ptr + b * R + rows, mask=rows < R, other=0.0)
            acc += tl.sum(u * u * r_sq[:, None], axis=0)
        cols = c0 + tl.arange(0, BLOCK_C)
        tl.store(col_sq_ptr + b * C + cols, 1.0 / tl.maximum(acc, 1.1754943508222875e-38), mask=cols < c_end)


@triton.jit
def _sinkgd_row_pass(scratch_ptr, row_sq_ptr, col_sq_ptr, b, numel, R, C, r_begin, r_end,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """SinkGD row half-step on U**2 for rows [r_begin, r_end): row_sq = 1 / max(U**2 @ col_sq, tiny)."""
    for r0 in range(r_begin, r_end, BLOCK_R):
        acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offsets, inside, rows, cols = _tile(b, numel, r0, c0, r_end, C, BLOCK_R, BLOCK_C)
            u = tl.load(scratch_ptr + offsets, mask=inside, other=0.0)
            c_sq = tl.load(col_sq_ptr + b * C + cols, mask=cols < C, other=0.0)
            acc += tl.sum(u * u * c_sq[None, :], axis=1)
        rows = r0 + tl.arange(0, BLOCK_R)
        tl.store(row_sq_ptr + b * R + rows, 1.0 / tl.maximum(acc, 1.1754943508222875e-38), mask=rows < r_end)


@triton.jit
def _column_scalings(col_parts_ptr, col_ptr, b, n_blocks, C, BLOCK_C: tl.constexpr):
    """SinkGD column half-step from the row blocks' partial column sums (b, block, C): their sum,
    in block order (bit-for-bit repeatable), as 1 / max(sum, tiny) into this program's col_ptr."""
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        acc = tl.zeros([BLOCK_C], dtype=tl.float32)
        for k in range(0, n_blocks):
            acc += tl.load(col_parts_ptr + (b * n_blocks + k) * C + cols, mask=cols < C, other=0.0)
        tl.store(col_ptr + cols, 1.0 / tl.maximum(acc, 1.1754943508222875e-38), mask=cols < C)


@triton.jit
def _add_column_sums(grad_ptr, exp_avg_ptr, weight_ptr, col_out_ptr, b, numel, r0, r_begin, r_end, C, r_sq,
                     projection, IS_MATRIX: tl.constexpr, GRAMS: tl.constexpr, ORTHO: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Adds one tile row's sum over rows of U**2 * r_sq to this block's partial column sums (the
    first tile row of the block stores them), U computed again (from L2: the tile row was just read)."""
    for c0 in range(0, C, BLOCK_C):
        offsets, inside, rows, cols = _tile(b, numel, r0, c0, r_end, C, BLOCK_R, BLOCK_C)
        local = rows[:, None] * C + cols[None, :]
        g_tile, m_tile, u = _direction_tile(grad_ptr, exp_avg_ptr, weight_ptr, offsets, local, inside, projection,
                                            IS_MATRIX, GRAMS, ORTHO)
        part = tl.sum(u * u * r_sq[:, None], axis=0)
        not_first = (cols * 0 + r0) > r_begin  # the block's first tile row stores, the others add
        part = tl.load(col_out_ptr + cols, mask=(cols < C) & not_first, other=0.0) + part
        tl.store(col_out_ptr + cols, part, mask=cols < C)
    tl.debug_barrier()  # stored before the next tile row's threads load them


# ----------------------------------------------------------------------------------------------
# The passes, each over rows [r_begin, r_end) of tensor b: a whole tensor in the one-program kernel,
# a block of rows in the split kernels for large tensors.
# ----------------------------------------------------------------------------------------------


@triton.jit
def _pass_reductions(grad_ptr, exp_avg_ptr, weight_ptr, x0_ptr, b, numel, r_begin, r_end, C,
                     IS_MATRIX: tl.constexpr, GRAMS: tl.constexpr, ABS_SUM: tl.constexpr,
                     SIGNAL: tl.constexpr, ORTHO: tl.constexpr, KEEP_NORM: tl.constexpr, GROWING: tl.constexpr,
                     BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Pass 0: sum g (the finite test), sum |g|, <g, x0 - x>, OrthoGrad's <u, x>, |x|^2, |u|^2 and,
    GROWING, the sum of sign(g) x sign(m) (exact: a sum of small integers): the split path's, whose
    second launch grows the factor from these sums (the one-program kernel sums it in pass 1)."""
    zeros = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    acc_sum = zeros
    acc_abs = zeros
    acc_signal = zeros
    acc_uw = zeros
    acc_ww = zeros
    acc_uu = zeros
    acc_agree = zeros
    for r0 in range(r_begin, r_end, BLOCK_R):
        for c0 in range(0, C, BLOCK_C):
            offsets, inside, rows, cols = _tile(b, numel, r0, c0, r_end, C, BLOCK_R, BLOCK_C)
            local = rows[:, None] * C + cols[None, :]  # within the tensor: grad and weight are its own
            g_raw = tl.load(grad_ptr + local, mask=inside, other=0.0).to(tl.float32)
            acc_sum += g_raw  # a NaN/Inf survives the sum (the eager test, in the same spirit)
            g = _finite_or_zero(g_raw)
            if ABS_SUM:
                acc_abs += tl.abs(g)
            if ORTHO or GROWING:
                m = tl.load(exp_avg_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
                if GROWING:  # the momentum before this step, as the eager step reads it
                    acc_agree += _sign_agreement(g, m)
            if SIGNAL or ORTHO:
                w = tl.load(weight_ptr + local, mask=inside, other=0.0).to(tl.float32)
                if SIGNAL:  # Prodigy (arXiv 2306.06101): c = -<g, x - x0>
                    x0 = tl.load(x0_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
                    acc_signal += g * (x0 - w)
                if ORTHO:
                    u = _grams_direction(g, m, IS_MATRIX, GRAMS)
                    acc_uw += u * w
                    acc_ww += w * w
                    if KEEP_NORM:
                        acc_uu += u * u
    return (tl.sum(tl.sum(acc_sum, axis=1), axis=0), tl.sum(tl.sum(acc_abs, axis=1), axis=0),
            tl.sum(tl.sum(acc_signal, axis=1), axis=0), tl.sum(tl.sum(acc_uw, axis=1), axis=0),
            tl.sum(tl.sum(acc_ww, axis=1), axis=0), tl.sum(tl.sum(acc_uu, axis=1), axis=0),
            tl.sum(tl.sum(acc_agree, axis=1), axis=0))


@triton.jit
def _direction_scalars(total, signal, uw, ww, lr_bump, d_coef, momentum_weight,
                       SIGNAL: tl.constexpr, ORTHO: tl.constexpr):
    """Finite flag, Prodigy bump sizes, OrthoGrad's projection and the momentum weight of a tensor."""
    finite = total - total == 0.0
    finite_f = tl.where(finite, 1.0, 0.0)
    up = lr_bump * finite_f
    down = lr_bump * finite_f
    if SIGNAL:
        up = tl.where(signal > 0.0, lr_bump * d_coef, lr_bump) * finite_f
        down = tl.where(signal < 0.0, lr_bump * d_coef, lr_bump) * finite_f
    projection = 0.0
    if ORTHO:  # OrthoGrad (arXiv 2501.04697): remove the component along the weights
        projection = uw / tl.maximum(ww, 1.1754943508222875e-38)
    return finite, finite_f, up, down, projection, momentum_weight * finite_f


@triton.jit
def _pass_direction_and_state(grad_ptr, exp_avg_ptr, lr_mask_ptr, polarity_ptr, weight_ptr, scratch_ptr,
                              row_sq_ptr, col_out_ptr, table_ptr, b, slot, numel, r_begin, r_end, R, C,
                              finite, up, down, projection, lerp_weight, min_lr, max_lr,
                              state_noise_offset, mask_anchor, mask_step, mask_inverse, mask_bias, packed_bytes,
                              IS_MATRIX: tl.constexpr, GRAMS: tl.constexpr, VRADAM: tl.constexpr,
                              WARMUP: tl.constexpr, ORTHO: tl.constexpr, KEEP_NORM: tl.constexpr,
                              ROW_SUMS: tl.constexpr, COMPACT: tl.constexpr, SPLIT: tl.constexpr,
                              GROWING: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Pass 1: direction U (+ OrthoGrad) into the scratch buffer, momentum, sign history, mask;
    returns |m|^2, sum(mask), |U|^2 and, GROWING, the sum of sign(g) x sign(m) before the step
    (read here, not in pass 0: pass 1 holds both already); with ROW_SUMS also SinkGD's first row
    pass into row_sq.
    SPLIT (a block of a large tensor's rows): neither U nor the momentum is stored (the last launch
    stores the momentum: until then every pass can compute U again), and with ROW_SUMS the block's
    partial column sums of the next half-step go to col_out_ptr.
    COMPACT (``state_precision="bf16"``): momentum bf16 (stored with stochastic rounding), mask
    16-bit lattice codes, signs 8 per byte, ``packed_bytes`` per tensor (``core._step_bucket``)."""
    zeros = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
    acc_mm = zeros
    acc_mask = zeros
    acc_uu_after = zeros
    acc_agree = zeros
    for r0 in range(r_begin, r_end, BLOCK_R):
        row_acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offsets, inside, rows, cols = _tile(b, numel, r0, c0, r_end, C, BLOCK_R, BLOCK_C)
            local = rows[:, None] * C + cols[None, :]  # the element's index within its tensor
            g, m, u = _direction_tile(grad_ptr, exp_avg_ptr, weight_ptr, offsets, local, inside, projection,
                                      IS_MATRIX, GRAMS, ORTHO)
            if GROWING:
                acc_agree += _sign_agreement(g, m)
            m = _momentum_step(g, m, lerp_weight)
            if not SPLIT:
                _store_momentum(exp_avg_ptr, offsets, local, inside, m, table_ptr, state_noise_offset, COMPACT)
            if VRADAM:
                acc_mm += m * m
            if WARMUP:  # Automagic mask: up where the sign of g held, down where it flipped
                if COMPACT:  # bit j of byte k holds element 8k + j (core.pack_bits_)
                    byte = tl.load(polarity_ptr + b * packed_bytes + (local >> 3), mask=inside, other=0)
                    old = ((byte.to(tl.int32) >> (local & 7)) & 1) != 0
                else:
                    old = tl.load(polarity_ptr + offsets, mask=inside, other=0) != 0
                flip = tl.where(finite, (g > 0.0) != old, False)
                new_sign = old != flip
                if COMPACT:  # 8 neighbours of a row into one byte (rows hold whole bytes: C % 8 == 0)
                    weighted = tl.where(inside, new_sign, False).to(tl.int32) << (local & 7)
                    packed = tl.sum(tl.reshape(weighted, [BLOCK_R, BLOCK_C // 8, 8]), axis=2)
                    byte_cols = c0 // 8 + tl.arange(0, BLOCK_C // 8)
                    byte_inside = (rows[:, None] < r_end) & (byte_cols[None, :] * 8 < C)
                    tl.store(polarity_ptr + b * packed_bytes + rows[:, None] * (C // 8) + byte_cols[None, :],
                             packed.to(tl.uint8), mask=byte_inside)
                else:
                    tl.store(polarity_ptr + offsets, new_sign.to(tl.uint8), mask=inside)
                mask = _load_lr_mask(lr_mask_ptr, offsets, inside, mask_anchor, mask_step, COMPACT) + up
                mask = tl.where(flip, mask - (up + down), mask)
                mask = tl.minimum(tl.maximum(mask, min_lr), max_lr)
                if COMPACT:  # to the nearest lattice code (core.encode_lr_mask_: truncation of x + 0.5)
                    code = (mask * mask_inverse + mask_bias).to(tl.int32)
                    tl.store(lr_mask_ptr + offsets, code.to(tl.int16), mask=inside)
                else:
                    tl.store(lr_mask_ptr + offsets, mask, mask=inside)
                acc_mask += tl.where(inside, mask, 0.0)
            if KEEP_NORM:
                acc_uu_after += u * u
            if ROW_SUMS:
                row_acc += tl.sum(u * u, axis=1)
            if not SPLIT:
                tl.store(scratch_ptr + slot * numel + local, u, mask=inside)
        if ROW_SUMS:
            rows = r0 + tl.arange(0, BLOCK_R)
            r_sq = 1.0 / tl.maximum(row_acc, 1.1754943508222875e-38)
            tl.store(row_sq_ptr + slot * R + rows, r_sq, mask=rows < r_end)
            if SPLIT:
                _add_column_sums(grad_ptr, exp_avg_ptr, weight_ptr, col_out_ptr, b, numel, r0, r_begin, r_end, C,
                                 r_sq, projection, IS_MATRIX, GRAMS, ORTHO, BLOCK_R, BLOCK_C)
    return (tl.sum(tl.sum(acc_mm, axis=1), axis=0), tl.sum(tl.sum(acc_mask, axis=1), axis=0),
            tl.sum(tl.sum(acc_uu_after, axis=1), axis=0), tl.sum(tl.sum(acc_agree, axis=1), axis=0))


@triton.jit
def _decayed_lr_decay(lr_decay_ptr, decay_rate_ptr, b, finite_f):
    """Automagic's linear post-warm-up decay, one step (a skipped tensor keeps its value)."""
    return tl.load(lr_decay_ptr + b) - tl.load(decay_rate_ptr + b) * finite_f


@triton.jit
def _block_sum(partials_ptr, b, n_blocks, k, NB: tl.constexpr):
    """Partial sum k (of _PARTIALS) of tensor b over its row blocks, always in the same order: the
    split path's reductions are bit-for-bit repeatable (no float atomics, whose order varies)."""
    acc = tl.zeros([NB], dtype=tl.float32)
    for start in range(0, n_blocks, NB):
        blocks = start + tl.arange(0, NB)
        acc += tl.load(partials_ptr + (b * n_blocks + blocks) * _PARTIALS + k, mask=blocks < n_blocks, other=0.0)
    return tl.sum(acc, axis=0)


@triton.jit
def _rate_scalars(b, numel, R, finite_f, mm, mask_sum, abs_sum, uu, uu_after, lr_decay, lr_ratio, decay_floor,
                  weight_decay, growth,
                  avg_lr_ptr, row_scaling_ptr, group_mean_ptr, group_std_ptr,
                  VRADAM: tl.constexpr, WARMUP: tl.constexpr, DECAY: tl.constexpr, HAS_STATS: tl.constexpr,
                  KEEP_NORM: tl.constexpr, POST: tl.constexpr, HAS_ROW_SCALING: tl.constexpr,
                  GROWTH: tl.constexpr, BLOCK_R: tl.constexpr):
    """The tensor's new avg_lr, its rate (finite * decay * VRAdam brake [* growth factor]
    [* OrthoGrad norm restore]) and the weight-decay factor."""
    tiny = 1.1754943508222875e-38
    if WARMUP:
        avg_lr = mask_sum / numel
    else:
        avg_lr = tl.load(avg_lr_ptr + b)
    brake = 1.0
    if VRADAM:  # VRAdam (arXiv 2505.13196)
        brake = 1.0 / (1.0 + tl.minimum(3.0 * mm, 10.0))
    rate = finite_f
    if POST:  # the linear decay, capped by an outside scheduler's ratio, floored (0.1 by default)
        rate = rate * tl.maximum(tl.minimum(lr_decay, lr_ratio), decay_floor)
    if GROWTH:  # brake x factor first, as the eager step multiplies them before the decay
        brake = brake * growth
    rate = rate * brake
    if KEEP_NORM:  # OrthoGrad's norm restore, only when SinkGD does not rescale anyway
        norm_before = tl.sqrt(uu)
        norm_after = tl.sqrt(uu_after)
        rate = rate * tl.where(norm_after > 0.0, norm_before / tl.maximum(norm_after, tiny), 0.0)
    weight_factor = 1.0
    if DECAY:  # gradient-aware decoupled weight decay, theta = 2 * sigmoid(4 z)
        theta = 1.0
        if HAS_STATS:
            z = (abs_sum / numel - tl.load(group_mean_ptr)) / tl.maximum(tl.load(group_std_ptr), tiny)
            theta = 2.0 / (1.0 + tl.exp(-4.0 * z))
        mean_row_scaling = 1.0
        if HAS_ROW_SCALING:
            rs_acc = tl.zeros([BLOCK_R], dtype=tl.float32)
            for r0 in range(0, R, BLOCK_R):
                rows = r0 + tl.arange(0, BLOCK_R)
                rs_acc += tl.load(row_scaling_ptr + b * R + rows, mask=rows < R, other=0.0)
            mean_row_scaling = tl.sum(rs_acc, axis=0) / R
        weight_factor = 1.0 - avg_lr * mean_row_scaling * brake * theta * weight_decay * finite_f
    return avg_lr, rate, weight_factor


@triton.jit
def _pass_weights(scratch_ptr, lr_mask_ptr, weight_ptr, row_ptr, col_ptr, row_scaling_ptr,
                  table_ptr, b, slot, numel, r_begin, r_end, R, C, rate, weight_factor, sqrt_rows, weight_noise_offset,
                  mask_anchor, mask_step, grad_ptr, exp_avg_ptr, projection, lerp_weight, state_noise_offset,
                  SINKGD: tl.constexpr, DECAY: tl.constexpr,
                  HAS_ROW_SCALING: tl.constexpr, ROUND_BF16: tl.constexpr, COMPACT: tl.constexpr,
                  SPLIT: tl.constexpr, IS_MATRIX: tl.constexpr, GRAMS: tl.constexpr, ORTHO: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Pass 3: w = w * (1 - decay) - mask * rate * diag(r) U diag(c), r and c from SinkGD's buffers
    of 1 / norm^2 (r also times sqrt(rows), the target row norm), written into the weights in
    place (bf16 ones rounded stochastically). ``col_ptr`` is this program's column scalings.
    SPLIT: U computed again (not read from a buffer), and this step's momentum stored."""
    for r0 in range(r_begin, r_end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_factor = tl.zeros([BLOCK_R], dtype=tl.float32) + rate
        if SINKGD:
            row_scale = tl.sqrt(tl.load(row_ptr + slot * R + rows, mask=rows < r_end, other=0.0)) * sqrt_rows
            row_factor = row_scale * rate
        if HAS_ROW_SCALING:  # ALLoRA (arXiv 2410.09692) per-row factor
            row_factor = row_factor * tl.load(row_scaling_ptr + b * R + rows, mask=rows < r_end, other=0.0)
        for c0 in range(0, C, BLOCK_C):
            offsets, inside, rows2, cols = _tile(b, numel, r0, c0, r_end, C, BLOCK_R, BLOCK_C)
            local = rows2[:, None] * C + cols[None, :]
            if SPLIT:
                g, m, u = _direction_tile(grad_ptr, exp_avg_ptr, weight_ptr, offsets, local, inside, projection,
                                          IS_MATRIX, GRAMS, ORTHO)
                _store_momentum(exp_avg_ptr, offsets, local, inside, _momentum_step(g, m, lerp_weight), table_ptr,
                                state_noise_offset, COMPACT)
            else:
                u = tl.load(scratch_ptr + slot * numel + local, mask=inside, other=0.0)
            update = u * row_factor[:, None]
            if SINKGD:
                update = update * tl.sqrt(tl.load(col_ptr + cols, mask=cols < C, other=0.0))[None, :]
            w = tl.load(weight_ptr + local, mask=inside, other=0.0).to(tl.float32)
            if DECAY:
                w = w * weight_factor
            w = w - update * _load_lr_mask(lr_mask_ptr, offsets, inside, mask_anchor, mask_step, COMPACT)
            if ROUND_BF16:
                tl.store(weight_ptr + local, _round_to_bf16(w, table_ptr, weight_noise_offset, local), mask=inside)
            else:
                tl.store(weight_ptr + local, w, mask=inside)


# ----------------------------------------------------------------------------------------------
# The kernels. The gradients and weights of a bucket are read where they are, through tables of
# their addresses (no stacked copies, nothing copied back); the state is the optimizer's stacks.
# A small tensor is one program of one launch per bucket: each program steps tensors pid,
# pid + programs, ... with its own U buffer slot, so U takes (programs x numel) whatever the
# bucket's size. A large tensor takes 2 + iters launches of one program per block of rows, and
# no U buffer (see _split_launches).
# ----------------------------------------------------------------------------------------------


@triton.jit
def _tensor_address(table_ptr, b, BF16: tl.constexpr):
    """Tensor b's data, from the table of addresses (an int64 per tensor)."""
    address = tl.load(table_ptr + b)
    if BF16:
        pointer = address.to(tl.pointer_type(tl.bfloat16))
    else:
        pointer = address.to(tl.pointer_type(tl.float32))
    # 16-byte aligned (the host checks every data_ptr(), see takes_bucket): 128-bit (v4) accesses
    return tl.multiple_of(pointer, 16)


@triton.jit(do_not_specialize=["lr_ratio"])
def _bucket_step_kernel(
        grad_table_ptr, exp_avg_ptr, lr_mask_ptr, polarity_ptr, weight_table_ptr, x0_ptr,
        avg_lr_ptr, avg_lr_max_ptr, row_scaling_ptr, lr_decay_ptr, decay_rate_ptr, lr_growth_ptr,
        group_mean_ptr, group_std_ptr, scratch_ptr, row_sq_ptr, col_sq_ptr, table_ptr, noise_offsets_ptr,
        B, R, C, lr_ratio, decay_floor,
        momentum_weight, lr_bump, d_coef, min_lr, max_lr, weight_decay, sqrt_rows, growth_rate, growth_max,
        mask_anchor, mask_step, mask_inverse, mask_bias, packed_bytes,
        IS_MATRIX: tl.constexpr, GRAMS: tl.constexpr, VRADAM: tl.constexpr, WARMUP: tl.constexpr,
        SIGNAL: tl.constexpr, DECAY: tl.constexpr, HAS_STATS: tl.constexpr, ORTHO: tl.constexpr,
        KEEP_NORM: tl.constexpr, POST: tl.constexpr, HAS_ROW_SCALING: tl.constexpr,
        SINKGD_ITERS: tl.constexpr, ROUND_BF16: tl.constexpr, COMPACT: tl.constexpr,
        GROWTH: tl.constexpr, GROWING: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    slot = pid.to(tl.int64)  # this program's rows of the U, row and column buffers
    numel = R * C
    sinkgd: tl.constexpr = IS_MATRIX and SINKGD_ITERS > 0
    for tensor in range(pid, B, tl.num_programs(0)):
        b = tl.zeros([], dtype=tl.int64) + tensor  # 64-bit offsets into the stacked state
        tl.debug_barrier()  # the previous tensor's last pass has read this program's buffers
        grad_ptr = _tensor_address(grad_table_ptr, b, ROUND_BF16)  # gradients come in the weights' dtype
        weight_ptr = _tensor_address(weight_table_ptr, b, ROUND_BF16)
        # Rounding-table offsets of this tensor's weights and momentum (noise_offsets is (2, B)
        # int32, read only where something is rounded).
        weight_noise_offset = 0
        state_noise_offset = 0
        if ROUND_BF16:
            weight_noise_offset = tl.load(noise_offsets_ptr + b)
        if COMPACT:
            state_noise_offset = tl.load(noise_offsets_ptr + B + b)
        total, abs_sum, signal, uw, ww, uu, _ = _pass_reductions(
            grad_ptr, exp_avg_ptr, weight_ptr, x0_ptr, b, numel, 0, R, C, IS_MATRIX, GRAMS, DECAY and HAS_STATS,
            SIGNAL, ORTHO, KEEP_NORM, False, BLOCK_R, BLOCK_C)
        finite, finite_f, up, down, projection, lerp_weight = _direction_scalars(
            total, signal, uw, ww, lr_bump, d_coef, momentum_weight, SIGNAL, ORTHO)
        mm, mask_sum, uu_after, agreement = _pass_direction_and_state(
            grad_ptr, exp_avg_ptr, lr_mask_ptr, polarity_ptr, weight_ptr, scratch_ptr, row_sq_ptr, col_sq_ptr,
            table_ptr, b, slot, numel, 0, R, R, C, finite, up, down, projection, lerp_weight, min_lr, max_lr,
            state_noise_offset, mask_anchor, mask_step, mask_inverse, mask_bias, packed_bytes, IS_MATRIX, GRAMS,
            VRADAM, WARMUP, ORTHO, KEEP_NORM, sinkgd, COMPACT, False, GROWING, BLOCK_R, BLOCK_C)
        growth = 1.0
        if GROWTH:  # the opt-in per-tensor factor: grown in warm-up, applied at every step
            growth = tl.load(lr_growth_ptr + b)
            if GROWING:
                growth = _grown_factor(growth, agreement / numel, finite_f, growth_rate, growth_max)
                tl.debug_barrier()  # every thread has read the old value before one stores the new
                tl.store(lr_growth_ptr + b, growth)
        lr_decay = 1.0
        if POST:
            lr_decay = _decayed_lr_decay(lr_decay_ptr, decay_rate_ptr, b, finite_f)
            tl.debug_barrier()  # every thread has read the old value before one stores the new
            tl.store(lr_decay_ptr + b, lr_decay)
        avg_lr, rate, weight_factor = _rate_scalars(
            b, numel, R, finite_f, mm, mask_sum, abs_sum, uu, uu_after, lr_decay, lr_ratio, decay_floor, weight_decay,
            growth, avg_lr_ptr, row_scaling_ptr, group_mean_ptr, group_std_ptr, VRADAM, WARMUP, DECAY, HAS_STATS,
            KEEP_NORM, POST, HAS_ROW_SCALING, GROWTH, BLOCK_R)
        if WARMUP:
            tl.store(avg_lr_ptr + b, avg_lr)
            tl.store(avg_lr_max_ptr + b, tl.maximum(tl.load(avg_lr_max_ptr + b), avg_lr))
        if sinkgd:  # SinkGD's remaining half-steps, the U buffer read from L2 for small matrices
            tl.debug_barrier()  # row sums written by other threads of this program
            _sinkgd_col_pass(scratch_ptr, row_sq_ptr, col_sq_ptr, slot, numel, R, C, 0, C, BLOCK_R, BLOCK_C)
            for _ in range(SINKGD_ITERS - 1):
                tl.debug_barrier()
                _sinkgd_row_pass(scratch_ptr, row_sq_ptr, col_sq_ptr, slot, numel, R, C, 0, R, BLOCK_R, BLOCK_C)
                tl.debug_barrier()
                _sinkgd_col_pass(scratch_ptr, row_sq_ptr, col_sq_ptr, slot, numel, R, C, 0, C, BLOCK_R, BLOCK_C)
        tl.debug_barrier()  # U (and SinkGD's scalings) complete before the weights pass reads them
        _pass_weights(scratch_ptr, lr_mask_ptr, weight_ptr, row_sq_ptr, col_sq_ptr + slot * C, row_scaling_ptr,
                      table_ptr, b, slot, numel, 0, R, R, C, rate, weight_factor, sqrt_rows, weight_noise_offset,
                      mask_anchor, mask_step, grad_ptr, exp_avg_ptr, projection, lerp_weight, state_noise_offset,
                      sinkgd, DECAY, HAS_ROW_SCALING, ROUND_BF16, COMPACT, False, IS_MATRIX, GRAMS, ORTHO,
                      BLOCK_R, BLOCK_C)


@triton.jit
def _split_reductions_kernel(grad_table_ptr, exp_avg_ptr, weight_table_ptr, x0_ptr, partials_ptr, R, C,
                             ROWS_PER_PROGRAM,
                             IS_MATRIX: tl.constexpr, GRAMS: tl.constexpr, ABS_SUM: tl.constexpr,
                             SIGNAL: tl.constexpr, ORTHO: tl.constexpr, KEEP_NORM: tl.constexpr,
                             GROWING: tl.constexpr, BF16: tl.constexpr, BLOCK_R: tl.constexpr,
                             BLOCK_C: tl.constexpr):
    """Large tensors, launch 1: pass 0 over one block of rows, its sums into partials[b, block, 0:6]
    and, GROWING, [9] (summed over the blocks by the next launches, see _block_sum)."""
    b = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    r_begin = block * ROWS_PER_PROGRAM
    r_end = tl.minimum(r_begin + ROWS_PER_PROGRAM, R)
    total, abs_sum, signal, uw, ww, uu, agreement = _pass_reductions(
        _tensor_address(grad_table_ptr, b, BF16), exp_avg_ptr, _tensor_address(weight_table_ptr, b, BF16), x0_ptr,
        b, R * C, r_begin, r_end, C, IS_MATRIX, GRAMS, ABS_SUM, SIGNAL, ORTHO, KEEP_NORM, GROWING, BLOCK_R,
        BLOCK_C)
    base = partials_ptr + (b * tl.num_programs(1) + block) * _PARTIALS
    tl.store(base + 0, total)
    tl.store(base + 1, abs_sum)
    tl.store(base + 2, signal)
    tl.store(base + 3, uw)
    tl.store(base + 4, ww)
    tl.store(base + 5, uu)
    tl.store(base + 9, agreement)


@triton.jit
def _split_scalars(partials_ptr, b, n_blocks, lr_bump, d_coef, momentum_weight,
                   SIGNAL: tl.constexpr, ORTHO: tl.constexpr, NB: tl.constexpr):
    """``_direction_scalars`` of a large tensor, from the sums its row blocks left in launch 1."""
    signal = 0.0
    uw = 0.0
    ww = 0.0
    if SIGNAL:
        signal = _block_sum(partials_ptr, b, n_blocks, 2, NB)
    if ORTHO:
        uw = _block_sum(partials_ptr, b, n_blocks, 3, NB)
        ww = _block_sum(partials_ptr, b, n_blocks, 4, NB)
    return _direction_scalars(_block_sum(partials_ptr, b, n_blocks, 0, NB), signal, uw, ww, lr_bump, d_coef,
                              momentum_weight, SIGNAL, ORTHO)


@triton.jit
def _split_state_kernel(grad_table_ptr, exp_avg_ptr, lr_mask_ptr, polarity_ptr, weight_table_ptr,
                        row_sq_ptr, col_out_ptr, lr_decay_ptr, decay_rate_ptr, lr_growth_ptr, partials_ptr,
                        R, C, ROWS_PER_PROGRAM, lr_bump, d_coef, momentum_weight, min_lr, max_lr,
                        mask_anchor, mask_step, mask_inverse, mask_bias, packed_bytes, growth_rate, growth_max,
                        IS_MATRIX: tl.constexpr, GRAMS: tl.constexpr, VRADAM: tl.constexpr,
                        WARMUP: tl.constexpr, SIGNAL: tl.constexpr, ORTHO: tl.constexpr,
                        KEEP_NORM: tl.constexpr, POST: tl.constexpr, ROW_SUMS: tl.constexpr,
                        COMPACT: tl.constexpr, GROWING: tl.constexpr, BF16: tl.constexpr, BLOCK_R: tl.constexpr,
                        BLOCK_C: tl.constexpr, NB: tl.constexpr):
    """Large tensors, launch 2: pass 1 over one block of rows (sign history and mask; the momentum
    is stored by the last launch); its sums into partials[b, block, 6:9]; with ROW_SUMS SinkGD's
    first row half-step and the block's partial column sums of the second; the first block also
    steps lr_decay or, GROWING, the growth factor (both read by the last launch)."""
    b = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    n_blocks = tl.num_programs(1)
    r_begin = block * ROWS_PER_PROGRAM
    r_end = tl.minimum(r_begin + ROWS_PER_PROGRAM, R)
    finite, finite_f, up, down, projection, lerp_weight = _split_scalars(
        partials_ptr, b, n_blocks, lr_bump, d_coef, momentum_weight, SIGNAL, ORTHO, NB)
    mm, mask_sum, uu_after, _ = _pass_direction_and_state(
        _tensor_address(grad_table_ptr, b, BF16), exp_avg_ptr, lr_mask_ptr, polarity_ptr,
        _tensor_address(weight_table_ptr, b, BF16), exp_avg_ptr, row_sq_ptr,
        col_out_ptr + (b * n_blocks + block) * C, exp_avg_ptr, b, b, R * C,
        r_begin, r_end, R, C, finite, up, down, projection, lerp_weight, min_lr, max_lr,
        0, mask_anchor, mask_step, mask_inverse, mask_bias, packed_bytes,
        IS_MATRIX, GRAMS, VRADAM, WARMUP, ORTHO, KEEP_NORM, ROW_SUMS, COMPACT, True, False, BLOCK_R, BLOCK_C)
    base = partials_ptr + (b * n_blocks + block) * _PARTIALS
    tl.store(base + 6, mm)
    tl.store(base + 7, mask_sum)
    tl.store(base + 8, uu_after)
    if POST:
        if block == 0:
            lr_decay = _decayed_lr_decay(lr_decay_ptr, decay_rate_ptr, b, finite_f)
            tl.debug_barrier()  # every thread has read the old value before one stores the new
            tl.store(lr_decay_ptr + b, lr_decay)
    if GROWING:
        if block == 0:  # no other block of this launch reads the factor
            agreement = _block_sum(partials_ptr, b, n_blocks, 9, NB) / (R * C)
            growth = _grown_factor(tl.load(lr_growth_ptr + b), agreement, finite_f, growth_rate, growth_max)
            tl.debug_barrier()  # every thread has read the old value before one stores the new
            tl.store(lr_growth_ptr + b, growth)


@triton.jit
def _split_sinkgd_kernel(grad_table_ptr, exp_avg_ptr, weight_table_ptr, partials_ptr, row_sq_ptr, col_in_ptr,
                         col_out_ptr, col_ptr, R, C, ROWS_PER_PROGRAM,
                         IS_MATRIX: tl.constexpr, GRAMS: tl.constexpr, ORTHO: tl.constexpr, BF16: tl.constexpr,
                         BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, NB: tl.constexpr):
    """Large tensors, one SinkGD iteration per launch (launches 3 .. iters + 1), one block of rows:
    the column half-step from the previous launch's partial column sums, the row half-step over
    this block's rows, and this block's partial column sums for the next."""
    b = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    n_blocks = tl.num_programs(1)
    r_begin = block * ROWS_PER_PROGRAM
    r_end = tl.minimum(r_begin + ROWS_PER_PROGRAM, R)
    numel = R * C
    _, _, _, _, projection, _ = _split_scalars(partials_ptr, b, n_blocks, 0.0, 1.0, 0.0, False, ORTHO, NB)
    grad_ptr = _tensor_address(grad_table_ptr, b, BF16)
    weight_ptr = _tensor_address(weight_table_ptr, b, BF16)
    own_cols = col_ptr + (b * n_blocks + block) * C
    _column_scalings(col_in_ptr, own_cols, b, n_blocks, C, BLOCK_C)
    tl.debug_barrier()  # this program's column scalings stored before its threads read them
    for r0 in range(r_begin, r_end, BLOCK_R):
        row_acc = tl.zeros([BLOCK_R], dtype=tl.float32)
        for c0 in range(0, C, BLOCK_C):
            offsets, inside, rows, cols = _tile(b, numel, r0, c0, r_end, C, BLOCK_R, BLOCK_C)
            local = rows[:, None] * C + cols[None, :]
            g_tile, m_tile, u = _direction_tile(grad_ptr, exp_avg_ptr, weight_ptr, offsets, local, inside,
                                                projection, IS_MATRIX, GRAMS, ORTHO)
            c_sq = tl.load(own_cols + cols, mask=cols < C, other=0.0)
            row_acc += tl.sum(u * u * c_sq[None, :], axis=1)
        rows = r0 + tl.arange(0, BLOCK_R)
        r_sq = 1.0 / tl.maximum(row_acc, 1.1754943508222875e-38)
        tl.store(row_sq_ptr + b * R + rows, r_sq, mask=rows < r_end)
        _add_column_sums(grad_ptr, exp_avg_ptr, weight_ptr, col_out_ptr + (b * n_blocks + block) * C, b, numel,
                         r0, r_begin, r_end, C, r_sq, projection, IS_MATRIX, GRAMS, ORTHO, BLOCK_R, BLOCK_C)


@triton.jit(do_not_specialize=["lr_ratio"])
def _split_weights_kernel(grad_table_ptr, exp_avg_ptr, lr_mask_ptr, weight_table_ptr, row_ptr, col_in_ptr, col_ptr,
                          row_scaling_ptr, avg_lr_ptr, avg_lr_max_ptr, lr_decay_ptr, lr_growth_ptr, group_mean_ptr,
                          group_std_ptr, partials_ptr, table_ptr, noise_offsets_ptr, R, C, ROWS_PER_PROGRAM, lr_ratio,
                          decay_floor, weight_decay, sqrt_rows, mask_anchor, mask_step, momentum_weight,
                          IS_MATRIX: tl.constexpr, GRAMS: tl.constexpr, ORTHO: tl.constexpr,
                          VRADAM: tl.constexpr, WARMUP: tl.constexpr, DECAY: tl.constexpr,
                          HAS_STATS: tl.constexpr, KEEP_NORM: tl.constexpr, POST: tl.constexpr,
                          HAS_ROW_SCALING: tl.constexpr, SINKGD: tl.constexpr, ROUND_BF16: tl.constexpr,
                          COMPACT: tl.constexpr, GROWTH: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                          NB: tl.constexpr):
    """Large tensors, last launch: SinkGD's last column half-step, then this step's momentum and
    the weights of one block of rows; the first block stores avg_lr and avg_lr_max (no other
    block reads them: each computes avg_lr itself)."""
    b = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    r_begin = block * ROWS_PER_PROGRAM
    r_end = tl.minimum(r_begin + ROWS_PER_PROGRAM, R)
    numel = R * C
    n_blocks = tl.num_programs(1)
    weight_noise_offset = 0
    state_noise_offset = 0
    if ROUND_BF16:
        weight_noise_offset = tl.load(noise_offsets_ptr + b)
    if COMPACT:
        state_noise_offset = tl.load(noise_offsets_ptr + tl.num_programs(0) + b)
    _, finite_f, _, _, projection, lerp_weight = _split_scalars(
        partials_ptr, b, n_blocks, 0.0, 1.0, momentum_weight, False, ORTHO, NB)
    lr_decay = 1.0
    if POST:
        lr_decay = tl.load(lr_decay_ptr + b)
    growth = 1.0
    if GROWTH:  # this step's factor, grown by launch 2 in warm-up
        growth = tl.load(lr_growth_ptr + b)
    mm = 0.0
    mask_sum = 0.0
    abs_sum = 0.0
    uu = 0.0
    uu_after = 0.0
    if VRADAM:
        mm = _block_sum(partials_ptr, b, n_blocks, 6, NB)
    if WARMUP:
        mask_sum = _block_sum(partials_ptr, b, n_blocks, 7, NB)
    if DECAY and HAS_STATS:
        abs_sum = _block_sum(partials_ptr, b, n_blocks, 1, NB)
    if KEEP_NORM:
        uu = _block_sum(partials_ptr, b, n_blocks, 5, NB)
        uu_after = _block_sum(partials_ptr, b, n_blocks, 8, NB)
    avg_lr, rate, weight_factor = _rate_scalars(
        b, numel, R, finite_f, mm, mask_sum, abs_sum, uu, uu_after, lr_decay, lr_ratio, decay_floor, weight_decay,
        growth, avg_lr_ptr, row_scaling_ptr, group_mean_ptr, group_std_ptr, VRADAM, WARMUP, DECAY, HAS_STATS,
        KEEP_NORM, POST, HAS_ROW_SCALING, GROWTH, BLOCK_R)
    if WARMUP:
        if block == 0:
            tl.store(avg_lr_ptr + b, avg_lr)
            tl.store(avg_lr_max_ptr + b, tl.maximum(tl.load(avg_lr_max_ptr + b), avg_lr))
    own_cols = col_ptr + (b * n_blocks + block) * C
    if SINKGD:
        _column_scalings(col_in_ptr, own_cols, b, n_blocks, C, BLOCK_C)
        tl.debug_barrier()  # this program's column scalings stored before its threads read them
    _pass_weights(exp_avg_ptr, lr_mask_ptr, _tensor_address(weight_table_ptr, b, ROUND_BF16), row_ptr, own_cols,
                  row_scaling_ptr, table_ptr, b, b, numel, r_begin, r_end, R, C, rate, weight_factor, sqrt_rows,
                  weight_noise_offset, mask_anchor, mask_step, _tensor_address(grad_table_ptr, b, ROUND_BF16),
                  exp_avg_ptr, projection, lerp_weight, state_noise_offset, SINKGD, DECAY, HAS_ROW_SCALING,
                  ROUND_BF16, COMPACT, True, IS_MATRIX, GRAMS, ORTHO, BLOCK_R, BLOCK_C)


# ----------------------------------------------------------------------------------------------
# Host side: which buckets the kernel takes, and the launch.
# ----------------------------------------------------------------------------------------------


def tile_elements(device: torch.device) -> int:
    """Elements of one tile of every pass: 1024, 8 per thread of 4 warps, on every GPU, from the
    machine-code check (benchmarks/compile_kernels.py, ptxas of Triton 3.9): with 2048 the compact
    state's warm-up variants take 255 registers on sm_80 and some spill ~200 bytes on sm_90; with
    1024 the most is 168 registers. A thread still reads 128 bits per access (8 bf16, 2 x 4 fp32)."""
    return 1024


def _blocks(rows: int, cols: int, tile: int) -> tuple[int, int]:
    """Tile shape: a short menu (each entry is one compilation per phase) sized to the matrix's
    column count, ``tile`` elements per tile; vectors are one row."""
    if rows == 1:
        return 1, tile
    for block_c in (16, 64):
        if cols <= block_c:
            return tile // block_c, block_c
    return tile // 128, 128


def unsupported_reason(params: list[torch.Tensor], states: list[dict]) -> Optional[str]:
    """Why a bucket cannot take the fused step (None when it can); the eager step runs instead."""
    p = params[0]
    if not (p.is_cuda or (p.device.type == "cpu" and interpreting())):
        return f"tensors on {p.device} (Triton runs on CUDA, or on CPU only in its interpreter)"
    if p.is_cuda and torch.cuda.get_device_capability(p.device) < MIN_CAPABILITY:
        return (f"a GPU of compute capability {torch.cuda.get_device_capability(p.device)} (the kernels are "
                f"built and checked for {MIN_CAPABILITY} and later: Ampere, Ada, Hopper)")
    if p.dtype not in (torch.float32, torch.bfloat16):
        return f"{p.dtype} weights (float32 and bfloat16 only; float16's rounding stays eager)"
    state = states[0]
    compact = "lr_mask_codec" in state
    layout = ((torch.bfloat16, torch.uint16, torch.uint8) if compact else (torch.float32, torch.float32, torch.bool))
    if (state["exp_avg"].dtype, state["lr_mask"].dtype) != layout[:2] or (
            "polarity" in state and state["polarity"].dtype != layout[2]):
        return (f"a state of {state['exp_avg'].dtype} momentum and a {state['lr_mask'].dtype} mask "
                "(the kernels read state_precision 'fp32' and 'bf16' layouts)")
    if compact and "polarity" in state and p.ndim >= 2 and core._matrix_shape(p.shape)[1] % 8:
        return "packed signs of a matrix whose rows are not a whole number of bytes (columns % 8 != 0)"
    if p.numel() > _SPLIT_NUMEL and p.ndim < 2:
        return f"vectors of more than {_SPLIT_NUMEL} elements (split by rows only)"
    if p.numel() >= 2**31:
        return "a tensor of 2**31 elements or more (32-bit offsets within a tensor)"
    return None


# The oldest GPUs the kernels take: compute capability 8.0 (A100; sm_80 and sm_90 are what the
# machine-code check compiles). Older ones (Volta, Turing; Pascal, which Triton's CUDA 13 ptxas no
# longer targets) take the eager step.
MIN_CAPABILITY = (8, 0)
_ALIGNMENT = 16  # bytes: the kernels' 128-bit accesses of gradients and weights (tl.multiple_of)


def launch_guard(device: torch.device):
    """The tensors' GPU made current around the launches: Triton launches on the current device
    and its current stream, whatever device the tensors are on (parameters on cuda:1 while cuda:0
    is current would be read through cuda:0)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the device (cached by torch; 1 on CPU, the interpreter)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _fewest_row_blocks(rows: int) -> int:
    """sqrt(rows / 4) blocks of rows: each program's sum over every block's partial column sums
    (blocks x columns loads) then costs at most 1/8 of its own rows' work (rows / blocks x columns,
    twice)."""
    return max(1, math.isqrt(rows // 4))


def split_row_blocks(rows: int, block_r: int, batch: int, sms: int) -> int:
    """Programs (blocks of rows) per large tensor: ``_fewest_row_blocks``, or up to sqrt(rows)
    (the column sums at most 1/2 of the work) where a chunk has too few tensors to give each SM
    a program."""
    wanted = max(_fewest_row_blocks(rows), min(math.isqrt(rows), triton.cdiv(sms, batch)))
    return max(1, min(triton.cdiv(rows, block_r), wanted))


def split_chunk_numel(shape: tuple[int, int]) -> int:
    """Elements of a chunk of large (rows, cols) tensors the split kernels step in one set of
    launches: as many tensors as _SPLIT_BUFFER_NUMEL holds of their row scalings and their three
    (blocks, cols) column buffers (two of partial sums, one of scalings)."""
    rows, cols = shape
    per_tensor = rows + 3 * _fewest_row_blocks(rows) * cols
    return max(1, _SPLIT_BUFFER_NUMEL // per_tensor) * rows * cols


def _counted(*names: str) -> None:
    """Launch counter per kernel, for the benchmark's and the tests' launches-per-step figures."""
    for name in names:
        launches[name] = launches.get(name, 0) + 1


launches: dict[str, int] = {}


# U buffer of the one-program kernel: at most 32 MB whatever the bucket, enough for about 50
# programs side by side on (16, 10240) LoRA matrices, more on smaller ones (each program steps its
# share of the bucket's tensors in turn). Not tuned on a GPU yet.
_SCRATCH_NUMEL = 1 << 23
_SCRATCH_MAX_NUMEL = 1 << 25  # 128 MB: one program per SM for buckets of tensors up to _SPLIT_NUMEL


def bucket_math(grad_table: torch.Tensor, exp_avg: torch.Tensor, lr_mask: torch.Tensor,
                polarity: Optional[torch.Tensor], weight_table: torch.Tensor, initial_weight: Optional[torch.Tensor],
                avg_lr: torch.Tensor, avg_lr_max: torch.Tensor, row_scaling: Optional[torch.Tensor],
                lr_decay: Optional[torch.Tensor], decay_rate: Optional[torch.Tensor], group_mean: Optional[torch.Tensor],
                group_std: Optional[torch.Tensor], lr_ratio: float, *, warmup: bool, early: bool,
                use_orthograd: bool, post: bool, is_matrix: bool, beta1: float, lr_bump: float, d_coef: float,
                min_lr: float, max_lr: float, weight_decay: float, sinkgd_iters: int, grams: bool,
                vradam: bool, shape: tuple[int, ...], weight_dtype: torch.dtype, decay_floor: float = 0.1,
                noise_offsets: Optional[torch.Tensor] = None, codec: Optional[tuple[float, float]] = None,
                lr_growth: Optional[torch.Tensor] = None, growth_rate: float = 0.0, growth_max: float = 1.0,
                growing: bool = False) -> None:
    """``core._bucket_math`` in one launch per bucket (for a chunk of large tensors 2 + sinkgd_iters):
    the same state stacks, updated in place, but the gradients and weights as (B,) int64 tables of
    their addresses (contiguous tensors of ``shape`` and ``weight_dtype``, read and written where
    they are: bf16 weights rounded stochastically). ``noise_offsets``: (2, B) int32 rounding-table
    offsets of each tensor's weights and momentum, needed for bf16 weights or a compact state. With
    ``codec`` (a compact state: ``core.lr_mask_codec``) ``exp_avg`` is bf16, ``lr_mask`` uint16
    codes and ``polarity`` (B, ceil(numel / 8)) packed bytes, as ``core._step_bucket`` keeps them.
    ``lr_growth`` (B,), where given, the opt-in per-tensor factor (``core.momentum_agreement_growth_``),
    grown while ``growing`` and applied at every step."""
    batch = grad_table.shape[0]
    rows, cols = (shape[0], shape[1]) if is_matrix else (1, shape[0])
    device = exp_avg.device
    sinkgd = is_matrix and sinkgd_iters > 0
    signal = warmup and early and d_coef != 1 and initial_weight is not None
    decay = early and weight_decay > 0
    has_stats = decay and group_mean is not None
    bf16 = weight_dtype == torch.bfloat16
    compact = codec is not None
    growth = lr_growth is not None
    growing = growth and growing
    if (bf16 or compact) and noise_offsets is None:
        raise ValueError("bucket_math: bf16 weights or a compact state need noise_offsets")
    any_ = avg_lr  # stands in for the pointers a phase does not read
    table = core.rounding_noise_table(device) if bf16 or compact else any_
    noise_offsets = noise_offsets if bf16 or compact else any_
    anchor, step = codec if compact else (0.0, 0.0)
    inverse = 1.0 / step if step > 0 else 0.0
    # (mask_anchor, mask_step, mask_inverse, mask_bias): decode = anchor + step * code, encode as
    # core.encode_lr_mask_ computes it
    mask_codec = (anchor, step, inverse, 0.5 - anchor * inverse)
    packed_bytes = polarity.shape[-1] if compact and polarity is not None else 0
    if compact:
        exp_avg, lr_mask = exp_avg.view(torch.bfloat16), lr_mask.view(torch.int16)  # uint16 as int16 bits
    if polarity is not None:
        polarity = polarity.view(torch.uint8)
    block_r, block_c = _blocks(rows, cols, tile_elements(device))
    numel = rows * cols
    if numel > _SPLIT_NUMEL:  # the caller chunks the bucket (split_chunk_numel)
        _split_launches(
            grad_table, exp_avg, lr_mask, polarity if warmup else any_, weight_table,
            initial_weight if signal else any_, avg_lr, avg_lr_max,
            row_scaling if row_scaling is not None else any_, lr_decay if post else any_,
            decay_rate if post else any_, lr_growth if growth else any_, group_mean if has_stats else any_,
            group_std if has_stats else any_, table, noise_offsets, rows, cols, lr_ratio, decay_floor, beta1,
            lr_bump, d_coef, min_lr, max_lr, weight_decay, mask_codec, packed_bytes, growth_rate, growth_max,
            dict(IS_MATRIX=is_matrix, GRAMS=grams, VRADAM=vradam, WARMUP=warmup, SIGNAL=signal, DECAY=decay,
                 HAS_STATS=has_stats, ORTHO=use_orthograd, KEEP_NORM=use_orthograd and sinkgd_iters <= 0,
                 POST=post, HAS_ROW_SCALING=row_scaling is not None, COMPACT=compact, GROWTH=growth,
                 GROWING=growing),
            sinkgd_iters if sinkgd else 0, bf16, block_r, block_c)
        return
    # at least one program per SM where the bucket has the tensors (their U slots may then pass the cap)
    programs = min(batch, max(1, _SCRATCH_NUMEL // numel,
                              min(sm_count(device), _SCRATCH_MAX_NUMEL // numel)))
    scratch = torch.empty((programs, numel), dtype=torch.float32, device=device)
    row_sq = torch.empty((programs, rows) if sinkgd else (1,), dtype=torch.float32, device=device)
    col_sq = torch.empty((programs, cols) if sinkgd else (1,), dtype=torch.float32, device=device)
    _bucket_step_kernel[(programs,)](
        grad_table, exp_avg, lr_mask, polarity if warmup else any_, weight_table,
        initial_weight if signal else any_, avg_lr, avg_lr_max,
        row_scaling if row_scaling is not None else any_, lr_decay if post else any_,
        decay_rate if post else any_, lr_growth if growth else any_, group_mean if has_stats else any_,
        group_std if has_stats else any_, scratch, row_sq, col_sq, table, noise_offsets,
        batch, rows, cols, float(lr_ratio), decay_floor,
        1.0 - beta1, lr_bump, d_coef, min_lr, max_lr, weight_decay, float(rows) ** 0.5, float(growth_rate),
        float(growth_max), *mask_codec, packed_bytes,
        IS_MATRIX=is_matrix, GRAMS=grams, VRADAM=vradam, WARMUP=warmup, SIGNAL=signal, DECAY=decay,
        HAS_STATS=has_stats, ORTHO=use_orthograd,
        KEEP_NORM=use_orthograd and sinkgd_iters <= 0, POST=post, HAS_ROW_SCALING=row_scaling is not None,
        SINKGD_ITERS=sinkgd_iters if sinkgd else 0, ROUND_BF16=bf16, COMPACT=compact, GROWTH=growth,
        GROWING=growing, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=_NUM_WARPS, maxnreg=_MAX_NREG)
    _counted("bucket_step")


def _split_launches(grad_table, exp_avg, lr_mask, polarity, weight_table, initial_weight, avg_lr, avg_lr_max,
                    row_scaling, lr_decay, decay_rate, lr_growth, group_mean, group_std, table, noise_offsets,
                    rows, cols, lr_ratio, decay_floor, beta1, lr_bump, d_coef, min_lr, max_lr, weight_decay,
                    mask_codec, packed_bytes, growth_rate, growth_max, flags, sinkgd_iters, bf16, block_r,
                    block_c) -> None:
    """A chunk of large tensors in 2 + sinkgd_iters launches over blocks of rows (one SinkGD
    iteration each: a column half-step from the previous launch's partial column sums, then a row
    half-step; none with sinkgd_iters 0: 3 launches), partial sums added in a fixed order."""
    batch = grad_table.shape[0]
    device = exp_avg.device
    n_blocks = split_row_blocks(rows, block_r, batch, sm_count(device))
    rows_per_program = triton.cdiv(triton.cdiv(rows, n_blocks), block_r) * block_r
    grid = (batch, triton.cdiv(rows, rows_per_program))
    # every block writes all its partial sums (each launch's sums are its own): no zeroing
    partials = torch.empty((batch, grid[1], _PARTIALS.value), dtype=torch.float32, device=device)
    row_sq = torch.empty((batch, rows) if sinkgd_iters else (1,), dtype=torch.float32, device=device)
    # partial column sums, written by one launch and added up by the next (two in turn), and each
    # program's column scalings
    col_buffers = torch.empty((3, batch, grid[1], cols) if sinkgd_iters else (3, 1, 1, 1),
                              dtype=torch.float32, device=device)
    col_parts, col_scalings = col_buffers[:2], col_buffers[2]
    momentum_weight = 1.0 - beta1
    f = flags
    common = dict(IS_MATRIX=f["IS_MATRIX"], GRAMS=f["GRAMS"], ORTHO=f["ORTHO"], BLOCK_R=block_r, BLOCK_C=block_c,
                  num_warps=_NUM_WARPS, maxnreg=_MAX_NREG)
    _split_reductions_kernel[grid](
        grad_table, exp_avg, weight_table, initial_weight, partials, rows, cols, rows_per_program,
        ABS_SUM=f["HAS_STATS"], SIGNAL=f["SIGNAL"], KEEP_NORM=f["KEEP_NORM"], GROWING=f["GROWING"], BF16=bf16,
        **common)
    _split_state_kernel[grid](
        grad_table, exp_avg, lr_mask, polarity, weight_table, row_sq, col_parts[0], lr_decay, decay_rate, lr_growth,
        partials, rows, cols, rows_per_program, lr_bump, d_coef, momentum_weight, min_lr, max_lr, *mask_codec,
        packed_bytes, float(growth_rate), float(growth_max), VRADAM=f["VRADAM"], WARMUP=f["WARMUP"],
        SIGNAL=f["SIGNAL"], KEEP_NORM=f["KEEP_NORM"], POST=f["POST"], ROW_SUMS=sinkgd_iters > 0,
        COMPACT=f["COMPACT"], GROWING=f["GROWING"], BF16=bf16, NB=_BLOCK_SUM_WIDTH, **common)
    for iteration in range(1, sinkgd_iters):
        _split_sinkgd_kernel[grid](
            grad_table, exp_avg, weight_table, partials, row_sq, col_parts[(iteration - 1) % 2],
            col_parts[iteration % 2], col_scalings, rows, cols, rows_per_program, BF16=bf16, NB=_BLOCK_SUM_WIDTH,
            **common)
    _split_weights_kernel[grid](
        grad_table, exp_avg, lr_mask, weight_table, row_sq, col_parts[(sinkgd_iters - 1) % 2], col_scalings,
        row_scaling, avg_lr, avg_lr_max, lr_decay, lr_growth, group_mean, group_std, partials, table, noise_offsets,
        rows, cols,
        rows_per_program, float(lr_ratio), decay_floor, weight_decay, float(rows) ** 0.5, mask_codec[0],
        mask_codec[1], momentum_weight, VRADAM=f["VRADAM"], WARMUP=f["WARMUP"], DECAY=f["DECAY"],
        HAS_STATS=f["HAS_STATS"], KEEP_NORM=f["KEEP_NORM"], POST=f["POST"], HAS_ROW_SCALING=f["HAS_ROW_SCALING"],
        SINKGD=sinkgd_iters > 0, ROUND_BF16=bf16, COMPACT=f["COMPACT"], GROWTH=f["GROWTH"], NB=_BLOCK_SUM_WIDTH,
        **common)
    _counted("split_reductions", "split_state", *["split_sinkgd"] * max(0, sinkgd_iters - 1), "split_weights")


def _address_table(tensors: list[torch.Tensor], cache: dict, key: str) -> torch.Tensor:
    """(B,) int64 addresses of the tensors, on their device; uploaded again only when an address
    changed (parameters never move; gradients usually come back to the same blocks)."""
    addresses = [t.data_ptr() for t in tensors]
    cached = cache.get(key)
    if cached is None or cached[0] != addresses:
        cached = cache[key] = (addresses, core.offsets_tensor(addresses, torch.int64, tensors[0].device))
    return cached[1]


def takes_bucket(params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict], group: dict) -> bool:
    """Whether the fused kernels step this bucket (else the eager step runs): a supported layout
    (``unsupported_reason``), a float lr, and gradients the kernels can read where they are
    (contiguous, in the weights' dtype, 16-byte aligned: a view at an odd offset takes the eager step)."""
    if unsupported_reason(params, states) is not None or torch.is_tensor(group["lr"]):
        return False  # a tensor lr: a kernel argument would read it on the host each step
    dtype = params[0].dtype
    return (all(p.is_contiguous() and p.data_ptr() % _ALIGNMENT == 0 for p in params)
            and all(g.is_contiguous() and g.dtype == dtype and g.data_ptr() % _ALIGNMENT == 0 for g in grads))


def step_bucket(params: list[torch.Tensor], grads: list[torch.Tensor], states: list[dict], group: dict,
                phase, is_matrix: bool, group_stats: Optional[tuple], weight_seeds: list[int],
                state_seeds: Optional[list[int]], stack_cache: dict) -> bool:
    """``core._step_bucket`` for t >= 2 with the fused kernels, the whole bucket at once; False
    (nothing done) where the bucket is not one they take, so the caller runs the eager step. The
    seeds are the eager step's (per tensor, weights and a compact state's momentum), so both round
    from the same noise."""
    if phase.first or not takes_bucket(params, grads, states, group):
        return False
    shape = core._matrix_shape(params[0].shape)

    stacks = {key: core._bucket_stack(states, key, params, shape, stack_cache)
              for key in ("exp_avg", "lr_mask", "polarity", "initial_weight", "avg_lr", "avg_lr_max",
                          "row_scaling", "lr_decay", "decay_rate", "lr_growth")}
    if not all(t.is_contiguous() for t in stacks.values() if t is not None):
        return False
    bf16 = params[0].dtype == torch.bfloat16
    codec = states[0].get("lr_mask_codec")
    if codec is not None and not state_seeds:
        return False  # a compact state must round from its own (tensor, step) seeds
    noise_offsets = None  # fp32 weights and state round nothing: no table, no per-step host tensor
    if bf16 or codec is not None:
        offsets = [[core.rounding_noise_offset(seed) for seed in weight_seeds] if bf16 else [0] * len(params),
                   [core.rounding_noise_offset(seed) for seed in state_seeds] if state_seeds else [0] * len(params)]
        noise_offsets = core.offsets_tensor(offsets, torch.int32, params[0].device)
    with launch_guard(params[0].device):
        _launch_bucket(params, grads, stacks, group, phase, is_matrix, group_stats, shape, bf16, codec,
                       noise_offsets, stack_cache)
    return True


def _launch_bucket(params, grads, stacks, group, phase, is_matrix, group_stats, shape, bf16, codec,
                   noise_offsets, stack_cache) -> None:
    bucket_math(
        _address_table(grads, stack_cache, "grad_addresses"), stacks["exp_avg"], stacks["lr_mask"],
        stacks["polarity"], _address_table(params, stack_cache, "weight_addresses"), stacks["initial_weight"],
        stacks["avg_lr"], stacks["avg_lr_max"], stacks["row_scaling"], stacks["lr_decay"], stacks["decay_rate"],
        *(group_stats or (None, None)), group["lr"] / group["lr_max"],
        warmup=phase.warmup, early=phase.early, use_orthograd=phase.orthograd, post=phase.post,
        is_matrix=is_matrix, beta1=group["beta1"], lr_bump=group["lr_bump"], d_coef=group["d_coef"],
        min_lr=group["mask_min_lr"], max_lr=group["mask_max_lr"], weight_decay=group["weight_decay"],
        sinkgd_iters=group["sinkgd_iters"], grams=group["grams"], vradam=group["vradam"],
        shape=shape, weight_dtype=params[0].dtype, decay_floor=float(group["decay_floor"]),
        noise_offsets=noise_offsets, codec=codec,
        lr_growth=stacks["lr_growth"] if group["lr_growth"] else None, growth_rate=float(group["lr_growth"] or 0.0),
        growth_max=float(group["lr_growth_max"]), growing=phase.growing)
