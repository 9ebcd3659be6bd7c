"""Data-parallel replicas stay bit-identical: 2 processes (gloo, CPU), 20 steps, fp32 and bf16
weights (bf16 exercises the stochastic rounding, which must draw the same bits on every rank),
in fp32 and bf16 optimizer state (the latter rounds its momentum stochastically too)."""

import hashlib
import os
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _digest(tensors) -> str:
    sha = hashlib.sha256()
    for t in tensors:
        sha.update(t.detach().float().contiguous().numpy().tobytes())
    return sha.hexdigest()


def _worker(rank: int, world: int, init_file: str, out_dir: str, state_precision: str) -> None:
    sys.path.insert(0, ROOT)
    from library.automagic_sinkgd import Automagic_Sinkgd

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)  # identical initial weights on every rank
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
    model[2].to(torch.bfloat16)
    optimizer = Automagic_Sinkgd(model.parameters(), lr=1e-3, min_lr=1e-5, max_lr=1e-2, lr_bump=1e-4,
                                 warmup_steps=8, orthograd=True, weight_decay=1e-2, stats_update_freq=2,
                                 state_precision=state_precision)
    initial = _digest(list(model.parameters()))
    # Ranks draw different random numbers from here on, as a trainer's noise sampling does; an
    # optimizer that used the global RNG (say, for its rounding) would now fall out of step.
    torch.manual_seed(1000 + rank)
    data = torch.Generator().manual_seed(100 + rank)  # each rank sees its own batches
    for _ in range(20):
        x = torch.randn(32, 16, generator=data)
        hidden = model[1](model[0](x))
        loss = model[2](hidden.to(torch.bfloat16)).float().pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        for p in model.parameters():  # what DDP does: average the gradients in float32
            grad = p.grad.float()
            dist.all_reduce(grad)
            p.grad = (grad / world).to(p.dtype)
        optimizer.step()
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
        f.write(f"{initial} {_digest(list(model.parameters()))} {_digest(state)}")
    # Both ranks leave together: a rank that tears gloo down while its peer is still talking to
    # it can abort the peer ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available in this torch build")
@pytest.mark.parametrize("state_precision", ["fp32", "bf16"])
def test_two_replicas_stay_bit_identical(tmp_path, state_precision):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path), state_precision), nprocs=2, join=True)
    (initial, *final), (_, *other_final) = ((tmp_path / f"rank{r}.txt").read_text().split() for r in range(2))
    assert final == other_final
    assert final[0] != initial  # the weights did train
