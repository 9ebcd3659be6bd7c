"""The host-sync guard (tests/host_sync.py) itself, and the fused step under it.

The guard must fail on each kind of host sync and let through what is not one; the eager step's
no-sync tests (in test_automagic_sinkgd.py, test_state_precision.py, test_schedule_options.py and
test_optim_contract.py) wrap it around step() and step_param() on CPU and on the meta device; the
fused step (Triton's interpreter on CPU, the kernels on CUDA) is checked here.
"""

import pytest
import torch

from fused_support import fused_kernels_or_skip
from host_sync import HostSyncGuard, cuda_sync_errors, no_host_sync
from library.automagic_sinkgd import Automagic_Sinkgd

torch.set_num_threads(1)

# What a step must never do, each a sync on a GPU: (name, the call on a (4, 5) tensor x).
SYNCS = [
    ("item", lambda x: x.sum().item()),
    ("float", lambda x: float(x.sum())),
    ("bool", lambda x: bool(x.sum() > 0)),
    ("nonzero", lambda x: torch.nonzero(x)),
    ("where with one argument", lambda x: torch.where(x > 0)),
    ("boolean-mask indexing", lambda x: x[x > 0]),
    ("boolean-mask assignment", lambda x: x.__setitem__(x > 0, 0.0)),
    ("masked_select", lambda x: x.masked_select(x > 0)),
    ("unique", lambda x: torch.unique(x)),
    ("equal", lambda x: torch.equal(x, x)),
    (".cpu()", lambda x: x.cpu()),
    (".tolist()", lambda x: x.tolist()),
]
# Device-to-host copies that never reach the dispatcher from a CPU tensor (no copy there): seen on
# the meta device, where they are copies, as on a GPU.
COPIES = [
    (".to('cpu')", lambda x: x.to("cpu")),
    ("copy_ into a host tensor", lambda x: torch.empty(4, 5).copy_(x)),
]
# What a step does all the time and must be allowed to.
NOT_SYNCS = [
    ("arithmetic", lambda x: x.mul(2).add_(1)),
    ("integer indexing (a gather of known size)", lambda x: x[torch.arange(2, device=x.device)]),
    ("where with three arguments", lambda x: torch.where(x > 0, x, 0.0)),
    ("a reduction kept on the device", lambda x: torch.isfinite(x.sum())),
    ("a copy within the device", lambda x: torch.empty_like(x).copy_(x)),
]


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("name, call", SYNCS, ids=[s[0] for s in SYNCS])
def test_the_guard_fails_on_each_kind_of_host_sync(device, name, call):
    x = torch.randn(4, 5).to(device)
    with pytest.raises(AssertionError, match="host sync"):
        with no_host_sync():
            call(x)


@pytest.mark.parametrize("name, call", COPIES, ids=[c[0] for c in COPIES])
def test_the_guard_sees_device_to_host_copies_by_their_devices(name, call):
    x = torch.randn(4, 5).to("meta")
    with pytest.raises(AssertionError, match="copies from meta to the host"):
        with HostSyncGuard():
            call(x)


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("name, call", NOT_SYNCS, ids=[s[0] for s in NOT_SYNCS])
def test_the_guard_lets_device_work_through(device, name, call):
    x = torch.randn(4, 5).to(device)
    with no_host_sync():
        call(x)


def _run_guarded(params, steps, per_param, **settings):
    optimizer = Automagic_Sinkgd(params, **settings)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator).mul_(1e-3).to(p)
        with no_host_sync():
            if per_param:
                for p in params:
                    optimizer.step_param(p, optimizer.param_groups[0])
            else:
                optimizer.step()
    return optimizer


# warm-up 4: t = 1 eager (ADOPT), t = 2 early warm-up (statistics, decay, Prodigy), t = 3 late
# warm-up, t = 4 decay, t = 5 and on OrthoGrad: every phase of the fused kernels.
_FUSED = dict(lr=1e-4, warmup_steps=4, orthograd=True, stats_update_freq=2, weight_decay=1e-2, fused=True)


@pytest.mark.parametrize("per_param", [False, True])
@pytest.mark.parametrize("weights, precision", [(torch.float32, "fp32"), (torch.bfloat16, "bf16")])
def test_the_fused_step_has_no_host_syncs(per_param, weights, precision):
    """One-program kernels (whole buckets): a stack of two matrices and a vector."""
    kernels = fused_kernels_or_skip()
    kernels.launches.clear()
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s).to(weights)) for s in [(4, 16), (4, 16), (12,)]]
    _run_guarded(params, 6, per_param, state_precision=precision, **_FUSED)
    assert kernels.launches.get("bucket_step", 0) >= 2 * 5  # the guarded steps did run the kernels


@pytest.mark.parametrize("weights, precision", [(torch.float32, "fp32"), (torch.bfloat16, "bf16")])
def test_the_split_fused_step_has_no_host_syncs(monkeypatch, weights, precision):
    """Tensors above the split size take three launches plus SinkGD's (sizes lowered, so that a
    (24, 16) matrix and a 300-element vector split, as full fine-tune tensors do on a GPU)."""
    kernels = fused_kernels_or_skip()
    monkeypatch.setattr(kernels, "_SPLIT_NUMEL", 256)
    kernels.launches.clear()
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s).to(weights)) for s in [(24, 16), (300,)]]
    _run_guarded(params, 6, False, state_precision=precision, **_FUSED)
    assert kernels.launches.get("split_weights", 0) >= 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("per_param", [False, True])
def test_the_cuda_step_has_no_host_syncs(per_param, fused):
    """On a GPU, no_host_sync() adds torch.cuda.set_sync_debug_mode("error") to the guard."""
    from library.automagic_sinkgd import rounding_noise_table

    # bf16 rounding reads a table uploaded once per device and kept (a blocking 512 KB copy the
    # first time, which the sync debug mode would flag); upload it before the guarded steps.
    rounding_noise_table("cuda")
    torch.manual_seed(0)
    # vectors of two lengths: the eager step stacks them padded
    params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in [(4, 12), (4, 12), (12,), (7,), (40, 700)]]
    params.append(torch.nn.Parameter(torch.randn(16, 24, device="cuda", dtype=torch.bfloat16)))
    _run_guarded(params, 6, per_param, **dict(_FUSED, fused=fused))
    torch.cuda.synchronize()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sync_errors_fails_on_a_cuda_sync():
    x = torch.randn(8, device="cuda")
    with pytest.raises(RuntimeError):
        with cuda_sync_errors():
            x.sum().item()
    x.sum().item()  # the previous mode is back
