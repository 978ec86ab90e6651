"""Implicit layers inside DistributedDataParallel: 2 CPU processes (gloo) give the gradients of one
process on the same global batch.

DDP averages the ranks' gradients.  With the global batch split evenly and each rank's loss the mean
over its shard, the average of the shard gradients is the gradient of the mean loss over the global
batch — the single-process reference computed here.  The workers are this file run as a script with
the environment ``torchrun`` would give them (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

The models: a DEQ between two linear layers, and a ``QPLayer`` head (skipped while
``implicitdiff.nn.QPLayer`` does not exist).  Add a layer by adding a builder to :data:`MODELS`.
"""

from __future__ import annotations

import importlib
import os
import socket
import subprocess
import sys

import pytest
import torch

D = torch.float64
GLOBAL_BATCH, WORLD = 8, 2


class Cell(torch.nn.Module):
    def __init__(self, n):
        super().__init__()
        self.lin = torch.nn.Linear(n, n, dtype=D)
        self.norm = torch.nn.LayerNorm(n, dtype=D)
        with torch.no_grad():
            self.lin.weight.mul_(0.5)

    def forward(self, z, x):
        return torch.tanh(self.norm(self.lin(z)) + x)


def build_deq():
    from implicitdiff.nn import DEQ

    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 6, dtype=D), DEQ(Cell(6), rtol=1e-12), torch.nn.Linear(6, 2, dtype=D))


class QPHead(torch.nn.Module):
    """``x ↦ argmin ½‖z‖²_Q + (W x)ᵀz  s.t.  G z ≤ h``, with ``Q`` (factor), ``G``, ``h`` and ``W`` learned."""

    def __init__(self):
        super().__init__()
        from implicitdiff.nn import QPLayer

        self.lin = torch.nn.Linear(3, 4, dtype=D)
        self.qp = QPLayer(4, n_ineq=3, learn=("Q", "G", "h"), Q=2 * torch.eye(4, dtype=D), q_ridge=0.1,
                          dtype=D, generator=torch.Generator().manual_seed(2))
        self.out = torch.nn.Linear(4, 2, dtype=D)

    def forward(self, x):
        return self.out(self.qp(p=self.lin(x)))


def build_qp():
    torch.manual_seed(0)
    return QPHead()


MODELS = {"deq": build_deq, "qp": build_qp}


def batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, 3, generator=g, dtype=D), torch.randn(GLOBAL_BATCH, 2, generator=g, dtype=D)


def loss_fn(model, x, y):
    return (model(x) - y).square().sum(-1).mean()


def reference_grads(name):
    model = MODELS[name]()
    x, y = batch()
    loss_fn(model, x, y).backward()
    return [p.grad for p in model.parameters()]


def _worker(name, out):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = DDP(MODELS[name]())
    x, y = batch()
    shard = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
    loss_fn(model, x[shard], y[shard]).backward()
    torch.save([p.grad for p in model.module.parameters()], f"{out}.{rank}")
    dist.barrier()
    dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("name", list(MODELS))
def test_ddp_gradients_equal_single_process(name, tmp_path):
    if name == "qp" and not hasattr(importlib.import_module("implicitdiff.nn"), "QPLayer"):
        pytest.skip("implicitdiff.nn.QPLayer is not available")
    port, out = _free_port(), tmp_path / name
    procs = []
    for rank in range(WORLD):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE")
        procs.append(subprocess.Popen([sys.executable, __file__, name, str(out)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(logs)[-4000:]
    ref = reference_grads(name)
    assert all(r is not None for r in ref)
    for rank in range(WORLD):
        grads = torch.load(f"{out}.{rank}")
        assert len(grads) == len(ref) and all(g is not None for g in grads)
        for g, r in zip(grads, ref):
            torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-11)
    # the comparison can fail: one shard's gradient alone is not the global one
    shard = MODELS[name]()
    x, y = batch()
    loss_fn(shard, x[: GLOBAL_BATCH // WORLD], y[: GLOBAL_BATCH // WORLD]).backward()
    assert max(float((p.grad - r).abs().max()) for p, r in zip(shard.parameters(), ref)) > 1e-6


if __name__ == "__main__":
    torch.set_num_threads(1)
    _worker(sys.argv[1], sys.argv[2])
