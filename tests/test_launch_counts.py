"""The launch counts in docs/gpu.md come from benchmarks/speed.py; the SDXL full fine-tune is
counted on the meta device (its weights do not fit in memory). Those counts are only worth
something if the meta device runs the same ops as real tensors: checked here on a small set."""
import pytest
import torch

from benchmarks import speed

pytest.importorskip("triton")

# one bucket of tensors the split kernels take (above 2^18 elements), one the one-program kernel
# takes, and vectors
SHAPES = [(640, 640)] * 3 + [(320, 40)] * 4 + [(640,)] * 2


@pytest.mark.parametrize("fused", [False, True], ids=["eager", "fused"])
@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_dispatched_ops_are_the_same_on_the_meta_device(fused, precision, dtype):
    def count(device, counter=speed.count_dispatched):
        with speed.gpu_configuration(), speed.dry_fused_kernels():
            optimizer = speed.Automagic_Sinkgd(speed.make_params(SHAPES, 0, dtype=dtype, device=device), lr=5e-5,
                                               min_lr=1e-6, max_lr=1e-3, full_finetune=True, warmup_steps=10**6,
                                               state_precision=precision, fused=fused)
            for _ in range(3):
                optimizer.step()
            return counter(optimizer)

    uploads = []
    on_cpu, on_meta = count("cpu"), count("meta", lambda optimizer: speed.count_dispatched(optimizer, uploads))
    # the same ops, plus the uploads of host-made tensors (a bf16 rounding's offsets), which are
    # copies on a device (meta, a GPU) and none on CPU
    assert on_meta == on_cpu + len(uploads)
    assert (len(uploads) > 0) == (precision == "bf16")
    assert on_cpu > (8 if fused else 200)  # the split path's launches; the eager step's ops


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_fused_sdxl_full_step_stays_under_300_launches(precision, dtype):
    """Every SDXL U-Net weight with fused=True, counted on the meta device as a GPU would launch:
    2 + sinkgd_iters launches per chunk of large tensors (row blocks leave the next SinkGD column
    half-step's partial sums), one chunk per large shape, one launch per smaller bucket (and, with
    a bf16 state or weights, one upload of rounding offsets each). Splitting the column and row
    half-steps again, or chunking by a U buffer, takes it back above 1,000."""
    from library import automagic_sinkgd_kernels as kernels
    shapes = speed.sdxl_full_shapes()
    with speed.gpu_configuration(), speed.dry_fused_kernels():
        optimizer = speed.Automagic_Sinkgd(speed.make_params(shapes, 0, dtype=dtype, device="meta"), lr=5e-5,
                                           min_lr=1e-6, max_lr=1e-3, full_finetune=True, warmup_steps=10**6,
                                           sinkgd_iters=5, state_precision=precision, fused=True)
        for _ in range(3):
            optimizer.step()
        before = dict(kernels.launches)
        launches = speed.count_dispatched(optimizer)
    launched = {name: count - before.get(name, 0) for name, count in kernels.launches.items()}
    chunks = launched["split_state"]
    assert launched["split_sinkgd"] == 4 * chunks and launched["split_weights"] == chunks
    assert chunks == 31  # one per large shape
    assert launches <= 300, launched


def test_large_set_timing_steps_one_optimizer_at_a_time():
    """benchmarks/gpu_check.sh times the SDXL full fine-tune with run_large_set (one optimizer's
    parameters alive at a time, bf16 weights drawn on the device); here on CPU with small shapes,
    so the GPU run does not meet its code for the first time."""
    rows, info = speed.run_large_set("small", [(64, 48)] * 2 + [(48,)], repeats=2, device="cpu", fused=False,
                                     steps_to_skip=2)
    assert [r["optimizer"] for r in rows] == list(speed.large_set_optimizers(fused=False))
    assert rows[0]["optimizer"] == "AdamW(fused)" and rows[0]["vs_fused"] == 1.0
    assert all(r["ms"] > 0 and r["launches"] > 0 and r["vs_foreach"] is None for r in rows)
    # the bf16 state of the full preset: ~6 bytes per parameter in early warm-up, AdamW's bf16 moments 4
    assert rows[1]["state_bytes_per_param"] < rows[0]["state_bytes_per_param"] + 3
    assert info["weights"] == "bf16" and info["params"] == 2 * 64 * 48 + 48


def test_cpu_operand_conversions_are_not_counted_as_launches():
    """On CPU an element-wise op converts an operand of another dtype (a Python number, as in
    ``x * 0.9``) with a ``.to`` of its own before its kernel; a GPU kernel converts as it reads and
    takes the number as an argument. Counted, those copies made every eager row 10-15 % too high."""
    t = torch.ones(8)

    class Step:
        def step(self):
            t.mul_(0.9)
            torch.add(t, 1.0)
            torch.lt(t, 0.5)
            torch.where(t > 0.5, t, 0.0)  # gt, where, and the 0.0 made a tensor on the device (a fill)
            t.to(torch.float64)  # a conversion the step asks for: a kernel on a GPU too

    assert speed.count_launches(Step(), "cpu") == 7  # 11 with the operand conversions
