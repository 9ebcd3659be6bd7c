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
