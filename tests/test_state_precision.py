"""state_precision="bf16": a compact optimizer state around the same float32 math.

Momentum in bf16 with stochastic rounding, the lr mask as a 16-bit lattice count, signs packed
8 per byte, x0 in bf16. These tests hold it to what the fp32 state does: the same bumps, the same
resume and replica guarantees, the same paths, and the memory it promises.
"""

import math

import pytest
import torch

from library.automagic_sinkgd import (
    NOISE_PERIOD,
    NOISE_PERIOD_STRIDE,
    Automagic_Sinkgd,
    add_rounding_noise_,
    automagic_mask_update_,
    decode_lr_mask,
    encode_lr_mask_,
    lr_mask_codec,
    pack_bits_,
    prodigy_bumps,
    rounding_noise_offset,
    rounding_noise_table,
    stochastic_round_,
    unpack_bits,
)
from host_sync import copy_grads, no_host_sync, on_device
from test_automagic_sinkgd import (_saved_and_resumed, _step_all, _synthetic_grads, _through_a_file,
                                  _train_small_classifier)


def _model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = torch.nn.ModuleDict(dict(
        lora_down=torch.nn.Linear(12, 4, bias=False),
        lora_up=torch.nn.Linear(4, 12, bias=True),
        conv=torch.nn.Conv2d(3, 5, 3),
        norm=torch.nn.LayerNorm(13),  # 13: the packed signs of a tensor not a multiple of 8 long
    ))
    return [torch.nn.Parameter(p.detach().to(dtype)) for p in model.parameters()]


def _train(params, optimizer, steps, start=0, per_param=False):
    for step in range(start, start + steps):
        _synthetic_grads(params, step)
        _step_all(optimizer, params, per_param=per_param)


FULL = dict(lr=1e-4, min_lr=1e-6, max_lr=1e-3, lr_bump=2e-5, warmup_steps=8, full_finetune=True,
            orthograd=True, d_coef=3, weight_decay=1e-2, stats_update_freq=3)


# ------------------------------------------------------------------ storage primitives


def test_rounding_noise_table_is_a_permutation_read_at_seeded_offsets():
    table = rounding_noise_table()
    assert table.dtype == torch.int32 and table.numel() == 2 * NOISE_PERIOD
    # every 16-bit value exactly once, so noise read at a uniform offset is exactly uniform
    assert torch.equal(table[:NOISE_PERIOD].sort().values, torch.arange(NOISE_PERIOD, dtype=torch.int32))
    assert torch.equal(table[:NOISE_PERIOD], table[NOISE_PERIOD:])
    # not a ramp: neighbouring entries are unrelated (a correlation near 0, not near 1)
    pairs = torch.stack([table[:NOISE_PERIOD - 1], table[1:NOISE_PERIOD]]).double()
    assert abs(torch.corrcoef(pairs)[0, 1].item()) < 0.02
    # offsets: deterministic per seed, spread over the whole period for consecutive seeds
    offsets = [rounding_noise_offset(seed) for seed in range(4096)]
    assert offsets == [rounding_noise_offset(seed) for seed in range(4096)]
    assert all(0 <= o < NOISE_PERIOD for o in offsets) and len(set(offsets)) > 3900
    # the same noise whichever way it is added: a period-spanning row, its tail, and a stack
    bits = torch.zeros(3, NOISE_PERIOD + 1000, dtype=torch.int32)
    add_rounding_noise_(bits, offsets[:3])
    for row, offset in zip(bits, offsets[:3]):
        i = torch.arange(row.numel())
        expected = table[(offset + i + (i // NOISE_PERIOD) * NOISE_PERIOD_STRIDE) % NOISE_PERIOD]
        assert torch.equal(row, expected)
        # elements one period apart read different noise (a column of a 1024-wide matrix, say)
        assert (row[:1000] != row[NOISE_PERIOD:NOISE_PERIOD + 1000]).float().mean() > 0.99
    # the one-gather form (a GPU's) adds the same noise as the row-by-row form (a CPU's)
    gathered = add_rounding_noise_(torch.zeros_like(bits), offsets[:3], gather=True)
    assert torch.equal(gathered, bits)


def test_stochastic_rounding_of_the_state_is_unbiased():
    # bf16 neighbours of 1.0 are 1 and 1 + 2**-7: a third of the way up, and a tiny 1e-4 step
    for value in (1.0 + 2**-7 / 3, 1.0 + 1e-4, -(1.0 + 2**-7 / 3)):
        low = abs(value) // 2**-7 * 2**-7 * math.copysign(1, value)
        high = (abs(value) // 2**-7 + 1) * 2**-7 * math.copysign(1, value)
        # one full period of the table: every noise value once, so the mean is exact to 2**-16 ulp
        source = torch.full((1, NOISE_PERIOD), value)
        target = torch.empty(source.shape, dtype=torch.bfloat16)
        stochastic_round_(target, source.clone(), noise_offsets=[rounding_noise_offset(7)])
        assert set(target.float().unique().tolist()) <= {low, high}
        assert abs(target.double().mean().item() - value) < 2**-7 * 2**-15
        # one element over 4096 steps (offsets from consecutive seeds): unbiased over time too
        over_time = torch.empty(4096, dtype=torch.bfloat16)
        for step in range(4096):
            stochastic_round_(over_time[step:step + 1], torch.tensor([value]),
                              noise_offsets=[rounding_noise_offset(step)])
        # binomial std of the mean over 4096 draws is <= 0.008 ulp: 0.05 ulp is far outside it
        assert abs(over_time.double().mean().item() - value) < 2**-7 * 0.05
    # a value bf16 holds exactly never moves, whatever the noise
    exact = torch.full((3, 4096), 0.375)
    target = torch.empty(exact.shape, dtype=torch.bfloat16)
    assert torch.equal(stochastic_round_(target, exact.clone(), noise_offsets=[1, 2, 3]).float(), exact)


@pytest.mark.parametrize("numel", [1, 7, 8, 13, 64, 1001])
def test_packed_signs_round_trip_in_the_documented_bit_order(numel):
    bits = (torch.rand(3, numel) > 0.5).to(torch.uint8)
    packed = torch.zeros(3, (numel + 7) // 8, dtype=torch.uint8)
    pack_bits_(packed, bits)
    assert torch.equal(unpack_bits(packed, numel), bits)
    for k in range(numel):  # bit j (value 1 << j) of byte k // 8 is element k
        assert (packed[1, k // 8].item() >> (k % 8)) & 1 == bits[1, k].item()


def test_mask_lattice_holds_the_bounds_and_every_bump_exactly():
    codec = lr_mask_codec(5e-7, 5e-4, 1e-5)  # the full preset
    anchor, step = codec
    assert (1e-5 / step) == pytest.approx(round(1e-5 / step), abs=1e-9)  # a bump is whole steps
    assert (5e-4 - 5e-7) / step <= 65535
    values = torch.tensor([[5e-7, 5e-7 + 1e-5, 5e-7 + 37e-5, 5e-4]])
    codes = encode_lr_mask_(torch.empty(values.shape, dtype=torch.uint16), values.clone(), codec)
    decoded = decode_lr_mask(codes, codec)
    torch.testing.assert_close(decoded[0, :3], values[0, :3], rtol=1e-6, atol=0)  # on the lattice
    assert abs(decoded[0, 3].item() - 5e-4) <= step / 2 * 1.001  # max_lr: the nearest lattice point


@pytest.mark.parametrize("d_coef", [2.0, 3.0])
def test_a_thousand_bumps_land_where_the_fp32_mask_lands(d_coef):
    """The mask update itself, run through a 16-bit store after every bump, against float32 and
    exact (float64) masks; Prodigy doubles (or triples) the up or the down moves, clamping hits
    both bounds."""
    min_lr, max_lr, lr_bump, start = 5e-7, 5e-4, 1e-5, 1e-5
    codec = lr_mask_codec(min_lr, max_lr, lr_bump)
    generator = torch.Generator().manual_seed(0)
    batch, numel = 4, 4096
    fp32 = torch.full((batch, numel), start)
    exact = torch.full((batch, numel), start, dtype=torch.float64)
    codes = encode_lr_mask_(torch.empty(batch, numel, dtype=torch.uint16), fp32.clone(), codec)
    # a drift per tensor (up-heavy to down-heavy) so elements sit at max_lr, at min_lr, in between
    agree_rate = torch.tensor([0.7, 0.55, 0.5, 0.3]).unsqueeze(1)
    hit_min = torch.zeros(batch, numel, dtype=torch.bool)
    hit_max = torch.zeros(batch, numel, dtype=torch.bool)
    for _ in range(1000):
        flips = (torch.rand(batch, numel, generator=generator) > agree_rate).float()
        signal = torch.randn(batch, generator=generator)
        up, down = prodigy_bumps(lr_bump, d_coef, signal, batch, fp32)
        automagic_mask_update_(fp32, flips, up, down, min_lr, max_lr)
        automagic_mask_update_(exact, flips.double(), up.double(), down.double(), min_lr, max_lr)
        mask = decode_lr_mask(codes, codec)
        automagic_mask_update_(mask, flips, up, down, min_lr, max_lr)
        encode_lr_mask_(codes, mask, codec)
        hit_min |= exact == min_lr
        hit_max |= exact == max_lr
    assert hit_min.any() and hit_max.any() and ((exact > min_lr) & (exact < max_lr)).any()
    compact = decode_lr_mask(codes, codec).double()
    # against exact arithmetic: only the start lr and max_lr sit off the lattice, by at most half
    # a step, and nothing accumulates over 1,000 bumps (plus float32's rounding of the decode)
    assert (compact - exact).abs().max().item() <= codec[1] / 2 + 1e-10
    # against the float32 mask, whose own rounding drifts by a few 1e-11 per bump
    assert (compact - fp32.double()).abs().max().item() < 1e-3 * lr_bump


def test_a_thousand_optimizer_steps_keep_the_mask_of_fp32():
    """Same, through the optimizer's step: against float64 weights (whose state is float64, exact
    for this purpose) and the float32 state, whose own rounding drifts by ~1e-11 per bump."""
    config = dict(lr=1e-5, min_lr=5e-7, max_lr=5e-4, lr_bump=1e-5, warmup_steps=2000, d_coef=1,
                  weight_decay=0.0, full_finetune=True)
    masks = {}
    for precision, dtype in (("fp32", torch.float64), ("fp32", torch.float32), ("bf16", torch.float32)):
        p = torch.nn.Parameter(torch.zeros(16, 64, dtype=dtype))
        optimizer = Automagic_Sinkgd([p], state_precision=precision, **config)
        generator = torch.Generator().manual_seed(5)
        drift = torch.linspace(-1.5, 1.5, 16).unsqueeze(1)  # rows that agree more or less often
        for _ in range(1001):
            p.grad = (torch.randn(16, 64, generator=generator) + drift).to(dtype)
            optimizer.step()
        state = optimizer.state[p]
        mask = state["lr_mask"]
        if precision == "bf16":
            mask = decode_lr_mask(mask, state["lr_mask_codec"])
        masks[precision, dtype] = (mask.double(), state["avg_lr"].double())
    (exact, exact_avg), (fp32, _), (compact, avg) = masks.values()
    assert (exact == 5e-4).any() and (exact == 5e-7).any() and ((exact > 5e-7) & (exact < 5e-4)).any()
    step = lr_mask_codec(5e-7, 5e-4, 1e-5)[1]
    assert (compact - exact).abs().max().item() <= step / 2 + 1e-10
    assert (compact - fp32).abs().max().item() < 2e-3 * 1e-5
    assert avg.item() == pytest.approx(exact_avg.item(), rel=1e-5)


# ------------------------------------------------------------------ the step in bf16 state


def test_layout_and_bytes_per_parameter_meet_the_targets():
    """The full preset with bf16 weights: <= 6.3 / 4.4 / 4.2 bytes per parameter in early warm-up
    / late warm-up / after it (fp32 state: 11 / 9 / 8)."""
    params = [torch.nn.Parameter(torch.randn(s).to(torch.bfloat16)) for s in [(64, 32, 3, 3), (640, 320), (320,)]]
    numel = sum(p.numel() for p in params)
    optimizer = Automagic_Sinkgd(params, lr=1e-5, min_lr=5e-7, max_lr=5e-4, d_coef=2, weight_decay=1e-4,
                                 warmup_steps=8, full_finetune=True, orthograd=True, stats_update_freq=5,
                                 state_precision="bf16")

    def bytes_per_param():
        return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
                   if torch.is_tensor(v)) / numel

    seen = []
    for step in range(10):
        _synthetic_grads(params, step)
        optimizer.step()
        if step + 1 in (1, 5, 9):  # t = 1 (early), t = 5 >= 8 / 2 (late), t = 9 >= 8 (after)
            seen.append(bytes_per_param())
    state = optimizer.state[params[1]]
    assert state["exp_avg"].dtype == torch.bfloat16 and state["lr_mask"].dtype == torch.uint16
    assert seen[0] <= 6.3 and seen[1] <= 4.4 and seen[2] <= 4.2, seen
    first = Automagic_Sinkgd([torch.nn.Parameter(torch.randn(640, 320))], state_precision="bf16")
    first.param_groups[0]["params"][0].grad = torch.randn(640, 320)
    first.step()
    state = first.state[first.param_groups[0]["params"][0]]
    assert state["polarity"].dtype == torch.uint8 and state["polarity"].shape == (640 * 320 // 8,)
    assert state["initial_weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16])
def test_batched_and_per_tensor_paths_agree(weights):
    """Each stacked tensor rounds its momentum from its own seed, so stacking changes nothing but
    float32's last bit (batched kernels sum in another order, as in fp32 state): nearly every
    state element is the same bit for bit; seeded per stack, half of them would differ.
    (bf16 weights round per stack, as in fp32 state: compare their state after a few steps.)"""
    shapes = [(16, 32)] * 3 + [(16, 32, 1, 1)] * 2 + [(32, 16)] * 4 + [(8, 3, 3, 3)] * 3 + [(13,)] * 3
    steps = 3 if weights == torch.bfloat16 else 14

    def run(foreach):
        torch.manual_seed(0)
        params = [torch.nn.Parameter((torch.randn(s) * 0.1).to(weights)) for s in shapes]
        optimizer = Automagic_Sinkgd(params, lr=1e-4, min_lr=1e-6, max_lr=1e-3, lr_bump=1e-5, warmup_steps=6,
                                     orthograd=True, state_precision="bf16", foreach=foreach)
        _train(params, optimizer, steps)
        return params, optimizer

    (batched, opt_b), (single, opt_s) = run(True), run(False)
    same = total = 0
    for p, q in zip(batched, single):
        if weights == torch.float32:
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(opt_b.state[p]["exp_avg"], opt_s.state[q]["exp_avg"], rtol=2**-7, atol=1e-9)
        for key in ("exp_avg", "lr_mask", "polarity"):
            if key in opt_b.state[p]:
                same += (opt_b.state[p][key] == opt_s.state[q][key]).sum().item()
                total += opt_b.state[p][key].numel()
    assert same >= 0.999 * total, (same, total)


def test_step_param_uses_the_compact_state_and_equals_step():
    def run(per_param):
        params = _model()
        optimizer = Automagic_Sinkgd(params, lr=1e-4, warmup_steps=6, weight_decay=0.0, orthograd=True,
                                     foreach=False, state_precision="bf16")
        _train(params, optimizer, 12, per_param=per_param)
        return params, optimizer
    (one_by_one, opt_p), (plain, _) = run(True), run(False)
    for p, q in zip(one_by_one, plain):
        assert torch.equal(p, q)
    assert opt_p.state[one_by_one[0]]["exp_avg"].dtype == torch.bfloat16


def test_compact_state_trains_like_fp32_state():
    losses = {precision: _train_small_classifier(state_precision=precision)[-1] for precision in ("fp32", "bf16")}
    # both reach the same plateau (fp32 state: ~3e-6 from ~2.3 at the start)
    assert losses["bf16"] < 1e-4 and losses["fp32"] < 1e-4, losses


def test_non_finite_gradient_leaves_the_compact_state_unchanged():
    params = _model()
    optimizer = Automagic_Sinkgd(params, lr=1e-4, warmup_steps=6, weight_decay=1e-2, stats_update_freq=1,
                                 state_precision="bf16")
    _train(params, optimizer, 3)
    bad = params[0]
    before = {k: v.clone() for k, v in optimizer.state[bad].items() if torch.is_tensor(v)}
    weight = bad.detach().clone()
    _synthetic_grads(params, 3)
    bad.grad[0, 0] = float("nan")
    optimizer.step()
    assert torch.equal(bad, weight)
    for key, value in before.items():
        assert torch.equal(optimizer.state[bad][key], value), key


def test_transient_memory_is_still_a_few_times_the_largest_tensor():
    from benchmarks.speed import transient_peak_bytes
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(640, 400)), torch.nn.Parameter(torch.randn(1024))] + \
             [torch.nn.Parameter(torch.randn(16, 320)) for _ in range(600)]
    optimizer = Automagic_Sinkgd(params, lr=1e-4, warmup_steps=100, state_precision="bf16")
    _train(params, optimizer, 3)
    _synthetic_grads(params, 3)
    try:
        peak = transient_peak_bytes(optimizer)
    except RuntimeError as error:
        pytest.skip(str(error))
    largest = 640 * 400 * 4
    assert largest < peak <= 8 * largest, f"transient {peak / 2**20:.1f} MiB vs largest {largest / 2**20:.1f} MiB"


def test_changed_bounds_re_encode_the_mask():
    p = torch.nn.Parameter(torch.zeros(4, 8))
    optimizer = Automagic_Sinkgd([p], lr=1e-4, min_lr=1e-6, max_lr=1e-3, lr_bump=1e-5, warmup_steps=50,
                                 d_coef=1, state_precision="bf16")
    for _ in range(3):
        p.grad = torch.ones(4, 8)
        optimizer.step()
    state = optimizer.state[p]
    before = decode_lr_mask(state["lr_mask"], state["lr_mask_codec"])
    optimizer.param_groups[0]["mask_max_lr"] = 2e-3  # the mask bounds; min_lr / max_lr belong to LR schedulers
    p.grad = torch.ones(4, 8)
    optimizer.step()  # one more bump up, on the new lattice
    after = decode_lr_mask(state["lr_mask"], state["lr_mask_codec"])
    assert state["lr_mask_codec"] == lr_mask_codec(1e-6, 2e-3, 1e-5)
    torch.testing.assert_close(after, before + 1e-5, rtol=0, atol=state["lr_mask_codec"][1])


# ------------------------------------------------------------------ resume


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("resume_at", [2, 5, 9, 13])  # early warm-up, late warm-up, after, later
def test_resume_is_bit_identical(dtype, resume_at):
    total, config = 16, dict(FULL, state_precision="bf16")
    straight = _model(dtype=dtype)
    _train(straight, Automagic_Sinkgd(straight, **config), total)

    resumed, optimizer = _saved_and_resumed(_model(dtype=dtype), config, resume_at, _train)
    expected = dict(exp_avg=torch.bfloat16, lr_mask=torch.uint16, polarity=torch.uint8,
                    initial_weight=torch.bfloat16, avg_lr=torch.float32)
    for p in resumed:
        for key, value in optimizer.state[p].items():
            if key in expected:
                assert value.dtype == expected[key], key
    _train(resumed, optimizer, total - resume_at, start=resume_at)
    for p, q in zip(straight, resumed):
        assert torch.equal(p, q)


@pytest.mark.parametrize("saved_in, loaded_in", [("fp32", "bf16"), ("bf16", "fp32")])
@pytest.mark.parametrize("resume_at", [2, 5, 9])
def test_a_state_saved_in_one_precision_is_converted_to_the_configured_one(saved_in, loaded_in, resume_at):
    params = _model()
    optimizer = Automagic_Sinkgd(params, **dict(FULL, state_precision=saved_in))
    _train(params, optimizer, resume_at)
    saved = _through_a_file(optimizer.state_dict())
    before = {id(p): dict(optimizer.state[p]) for p in params}

    converted = Automagic_Sinkgd(params, **dict(FULL, state_precision=loaded_in))
    converted.load_state_dict(saved)
    assert converted.param_groups[0]["state_precision"] == loaded_in  # the configured one wins
    for p in params:
        old, new = before[id(p)], converted.state[p]
        codec = (old if saved_in == "bf16" else new).get("lr_mask_codec")
        fp32_side, compact_side = (old, new) if saved_in == "fp32" else (new, old)
        assert fp32_side["exp_avg"].dtype == torch.float32 and compact_side["exp_avg"].dtype == torch.bfloat16
        # momentum: rounded to nearest one way, exact the other
        assert torch.equal(fp32_side["exp_avg"].to(torch.bfloat16), compact_side["exp_avg"])
        mask = decode_lr_mask(compact_side["lr_mask"], codec)
        assert (mask.double() - fp32_side["lr_mask"].double()).abs().max().item() <= codec[1] / 2 * 1.001
        if "polarity" in old:
            packed = compact_side["polarity"].view(1, -1)
            assert torch.equal(unpack_bits(packed, p.numel()).view(p.shape).bool(), fp32_side["polarity"])
        assert ("initial_weight" in old) == ("initial_weight" in new)
    _train(params, converted, 4, start=resume_at)  # and it keeps training
    assert all(torch.isfinite(p).all() for p in params)


def test_float64_weights_keep_float64_math_with_a_compact_state():
    """Only the storage is compact: float64 weights are updated in float64 (not rounded to float32
    precision every step), within the momentum's bf16 rounding of the fp32-state run."""
    runs = {}
    start = 1.0 + 1e-12 * torch.arange(32, dtype=torch.float64).view(4, 8)
    for precision in ("fp32", "bf16"):
        torch.manual_seed(0)
        w = torch.nn.Parameter(start.clone())
        optimizer = Automagic_Sinkgd([w], lr=1e-6, min_lr=1e-7, max_lr=1e-3, warmup_steps=100, weight_decay=0,
                                     state_precision=precision)
        for _ in range(3):
            w.grad = torch.randn_like(w) * 1e-3
            optimizer.step()
        assert w.dtype == torch.float64
        runs[precision] = w.detach()
    assert (runs["bf16"] - runs["bf16"].float().double()).abs().max().item() > 1e-9  # not float32 values
    moved = (runs["fp32"] - start).abs().max().item()
    assert (runs["bf16"] - runs["fp32"]).abs().max().item() < 0.01 * moved


# ------------------------------------------------------------------ settings


def test_bad_state_precision_names_the_setting_and_the_allowed_values():
    with pytest.raises(ValueError, match=r"state_precision='fp8'.*'fp32' or 'bf16'"):
        Automagic_Sinkgd([torch.nn.Parameter(torch.zeros(2))], state_precision="fp8")
    with pytest.raises(ValueError, match=r"state_precision.*param group 1"):
        Automagic_Sinkgd([{"params": [torch.nn.Parameter(torch.zeros(2))]},
                          {"params": [torch.nn.Parameter(torch.zeros(2))], "state_precision": "half"}])


def test_a_bump_too_small_for_the_16_bit_mask_is_refused_before_training():
    with pytest.raises(ValueError, match=r"lr_bump=1e-10 .*state_precision='bf16'"):
        Automagic_Sinkgd([torch.nn.Parameter(torch.zeros(2))], lr=1e-4, min_lr=0, max_lr=1e-3, lr_bump=1e-10,
                         state_precision="bf16")
    Automagic_Sinkgd([torch.nn.Parameter(torch.zeros(2))], lr=1e-4, lr_bump=0, state_precision="bf16")


def test_a_bump_too_small_for_the_16_bit_mask_is_refused_in_a_loaded_state_or_a_group_added():
    """The bounds and lr_bump that meet the 16-bit mask can come from a saved state (here one saved
    with an fp32 state, resumed in bf16) or a group added later: refused before training, by name."""
    p = torch.nn.Parameter(torch.randn(4, 4))
    saved = Automagic_Sinkgd([p], lr=1e-4, min_lr=0, max_lr=1e-3, lr_bump=1e-9, warmup_steps=8)
    p.grad = torch.randn(4, 4)
    saved.step()
    resumed = Automagic_Sinkgd([p], lr=1e-4, min_lr=0, max_lr=1e-3, warmup_steps=8, state_precision="bf16")
    with pytest.raises(ValueError, match=r"lr_bump \(param group 0 of the loaded state\)=1e-09 .*"
                                         r"\(max_lr - min_lr\) / 65535 = 1\.53e-08"):
        resumed.load_state_dict(saved.state_dict())
    assert resumed.state_dict()["state"] == {} and resumed.param_groups[0]["lr_bump"] == 1e-5  # left as it was
    with pytest.raises(ValueError, match=r"lr_bump \(param group 1\)=1e-09"):
        resumed.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))], "lr_bump": 1e-9})


def test_bounds_widened_during_training_past_the_16_bit_mask_stop_with_the_setting_named():
    p = torch.nn.Parameter(torch.randn(4, 4))
    optimizer = Automagic_Sinkgd([p], lr=1e-4, min_lr=1e-6, max_lr=1e-3, lr_bump=1e-5, warmup_steps=8,
                                 state_precision="bf16")
    for step in range(2):
        p.grad = torch.randn(4, 4)
        optimizer.step()
    optimizer.param_groups[0]["mask_max_lr"] = 1.0  # 1e-5 is below (1.0 - 1e-6) / 65535
    p.grad = torch.randn(4, 4)
    with pytest.raises(ValueError, match=r"lr_bump=1e-05 .*max_lr=1\.0"):
        optimizer.step()


def test_each_group_keeps_its_own_precision():
    a, b = torch.nn.Parameter(torch.randn(8, 8)), torch.nn.Parameter(torch.randn(8, 8))
    optimizer = Automagic_Sinkgd([{"params": [a], "state_precision": "bf16"}, {"params": [b]}], lr=1e-4)
    for _ in range(3):
        a.grad, b.grad = torch.randn(8, 8), torch.randn(8, 8)
        optimizer.step()
    assert optimizer.state[a]["exp_avg"].dtype == torch.bfloat16
    assert optimizer.state[b]["exp_avg"].dtype == torch.float32


def test_optimizer_args_set_the_precision():
    from library.optimizer_factory import parse_optimizer_args
    kwargs = parse_optimizer_args(["state_precision='bf16'", "full_finetune=True"])
    optimizer = Automagic_Sinkgd([torch.nn.Parameter(torch.zeros(4, 4))], **kwargs)
    assert optimizer.param_groups[0]["state_precision"] == "bf16"


@pytest.mark.parametrize("device", ["cpu", "meta"])  # meta: a copy to the host is a real copy there
@pytest.mark.parametrize("per_param", [False, True])
def test_the_compact_step_has_no_host_syncs(per_param, device):
    grads_from = _model()
    params = on_device(grads_from, device)
    optimizer = Automagic_Sinkgd(params, lr=1e-4, warmup_steps=6, orthograd=True, stats_update_freq=2,
                                 state_precision="bf16")
    for step in range(10):  # through every phase
        _synthetic_grads(grads_from, step)
        copy_grads(grads_from, params)
        with no_host_sync():
            _step_all(optimizer, params, per_param=per_param)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16])
def test_memory_benchmark_counts_what_real_steps_keep(precision, weights):
    """benchmarks/memory.py builds the state on the meta device; real steps must keep those bytes."""
    from collections import Counter

    from benchmarks.memory import FULL_PRESET, PHASES, automagic_bytes
    shapes = Counter({(16, 8, 3, 3): 2, (40, 24): 1, (13,): 3, (): 1})
    counted = automagic_bytes(shapes, weights, precision)
    params = [torch.nn.Parameter(torch.randn(s).to(weights)) for s, n in shapes.items() for _ in range(n)]
    optimizer = Automagic_Sinkgd(params, state_precision=precision, **FULL_PRESET)
    real = {}
    for t in range(1, max(PHASES.values()) + 1):
        _synthetic_grads(params, t)
        optimizer.step()
        for phase, at in PHASES.items():
            if t == at:
                real[phase] = sum(v.numel() * v.element_size() for s in optimizer.state.values()
                                  for v in s.values() if torch.is_tensor(v))
    assert real == counted
