"""Data-parallel training of a deep equilibrium classifier with DistributedDataParallel (CPU, gloo).

    torchrun --nproc_per_node=2 examples/ddp_deq.py [--steps 200]
    python examples/ddp_deq.py                       # one process, same code

Each process solves the equilibrium of its share of every batch and computes implicit gradients
for it; DDP averages the gradients across processes (the DEQ lifts the cell's parameters, so the
parameters' gradient hooks — which DDP's all-reduce listens to — fire as for any layer).  The
data (three spirals) are generated identically by every process from a shared seed and split by
rank.  At the end the script checks that every process holds the same parameters and prints the
test accuracy (≥ 90 % with the defaults).
"""

from __future__ import annotations

import argparse
import math
import os
import socket

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

from implicitdiff.nn import DEQ  # noqa: E402  (to become implicitdiff.nn.DEQ)


def spirals(n, *, classes=3, noise=0.2, generator=None):
    y = torch.randint(classes, (n,), generator=generator)
    r = torch.rand(n, generator=generator)
    t = 7.0 * r + y * (2 * math.pi / classes)
    x = torch.stack([r * torch.cos(t), r * torch.sin(t)], dim=1) * 3.0
    return x + noise * r.unsqueeze(1) * torch.randn(n, 2, generator=generator), y


class Cell(torch.nn.Module):
    """``f(z, u) = tanh(Ŵ z + u)``, ``Ŵ = W · min(1, 0.95 / ‖W‖_F)``: a contraction for any ``W``."""

    def __init__(self, width):
        super().__init__()
        self.W = torch.nn.Parameter(torch.randn(width, width) * 0.5 / math.sqrt(width))

    def forward(self, z, u):
        W = self.W * torch.clamp(0.95 / torch.linalg.matrix_norm(self.W), max=1.0)
        return torch.tanh(z @ W.mT + u)


def model(width=64):
    return torch.nn.Sequential(torch.nn.Linear(2, width), DEQ(Cell(width), rtol=1e-4, max_iter=50),
                               torch.nn.Linear(width, 3))


def _init():
    """Join the process group torchrun describes, or make a group of one."""
    if "RANK" not in os.environ:  # plain `python`: a world of one on a free local port
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=128, help="global batch, split across processes")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rank, world = _init()
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must be divisible by the number of processes {world}")
    torch.manual_seed(args.seed)                      # the same initial weights on every process
    net = DDP(model())
    g = torch.Generator().manual_seed(args.seed)      # the same data and batches on every process
    x_train, y_train = spirals(3000, generator=g)
    x_test, y_test = spirals(1000, generator=g)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    local = args.batch // world
    for step in range(args.steps):
        idx = torch.randint(len(x_train), (args.batch,), generator=g)[rank * local:(rank + 1) * local]
        loss = torch.nn.functional.cross_entropy(net(x_train[idx]), y_train[idx])
        opt.zero_grad()
        loss.backward()                               # DDP all-reduces (averages) the gradients here
        opt.step()
        if rank == 0 and step % max(1, args.steps // 10) == 0:
            iters = float(net.module[1].last_info.iterations.float().mean())
            print(f"step {step:4d}  loss {loss.item():.3f}  forward iterations {iters:.1f}", flush=True)

    # every process took the same steps: their parameters agree
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    spread = flat.clone()
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    spread -= flat
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    net.eval()
    with torch.no_grad():
        accuracy = float((net.module(x_test).argmax(1) == y_test).float().mean())
    if rank == 0:
        print(f"{world} process(es): test accuracy {100 * accuracy:.1f}%, largest parameter difference "
              f"between processes {float(spread.max()):.1e}")
    dist.destroy_process_group()
    return accuracy


if __name__ == "__main__":
    main()
