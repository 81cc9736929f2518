"""DDP gradient averaging of the SPCon trainers, run for real with two CPU processes (gloo backend).

Our student forward bypasses the DDP wrapper (it needs the bottleneck features), so `_sync_gradients` all-reduces
and averages the gradients itself; every rank must end with the mean of the ranks' gradients, including for a
parameter that got no gradient on one rank.
"""
import os
import types

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nnunet_contrastive.trainers.spcon import nnUNetTrainerSPCon


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        a, b = torch.nn.Linear(3, 2), torch.nn.Linear(2, 1)  # same initial weights on both ranks
        x = torch.full((4, 3), float(rank + 1))
        h = a(x)
        (b(h).sum() if rank == 0 else h.pow(2).sum()).backward()  # rank 1: b gets no gradient
        own = {k: None if p.grad is None else p.grad.clone()
               for k, p in [("a.w", a.weight), ("a.b", a.bias), ("b.w", b.weight), ("b.b", b.bias)]}
        fake = types.SimpleNamespace(is_ddp=True)
        nnUNetTrainerSPCon._sync_gradients(fake, list(a.parameters()) + list(b.parameters()))
        synced = {"a.w": a.weight.grad, "a.b": a.bias.grad, "b.w": b.weight.grad, "b.b": b.bias.grad}
        torch.save({"own": own, "synced": synced}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed/gloo missing")
def test_sync_gradients_averages_over_ranks(tmp_path):
    world = 2
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for key in ("a.w", "a.b", "b.w", "b.b"):
        own = [r["own"][key] if r["own"][key] is not None else torch.zeros_like(res[0]["synced"][key]) for r in res]
        expected = sum(own) / world
        for r in res:
            torch.testing.assert_close(r["synced"][key], expected)
    assert res[1]["own"]["b.w"] is None  # the no-gradient case was exercised
    assert not torch.equal(res[0]["own"]["a.w"], res[1]["own"]["a.w"])  # ranks really differed
