"""The minimal hand-written training loop bench is compared with: no harness, just the work.

Run under torchrun (or plain python for one process). Same model, seed, global batch, data shard and
optimizer as bench's defaults; prints one JSON line with samples/s on rank 0.
"""

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from bench.models import build_model, model_module

MLP = {"name": "mlp", "in_features": 512, "hidden": 1024, "layers": 4, "classes": 10}

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, required=True)
parser.add_argument("--warmup", type=int, required=True)
parser.add_argument("--global-batch", type=int, default=64)
args = parser.parse_args()

distributed = "RANK" in os.environ
if distributed:
    dist.init_process_group("gloo")
rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)

torch.manual_seed(0)
model = build_model(MLP)
if distributed:
    model = DistributedDataParallel(model)
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
per_rank = args.global_batch // world
x, y = model_module(MLP).synthetic_batch(MLP, args.global_batch, torch.Generator().manual_seed(1))
x, y = x[rank * per_rank : (rank + 1) * per_rank], y[rank * per_rank : (rank + 1) * per_rank]

for step in range(args.steps):
    if step == args.warmup:
        start = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
elapsed = time.perf_counter() - start

if rank == 0:
    measured = args.steps - args.warmup
    print(json.dumps({"samples_per_s": args.global_batch * measured / elapsed}))
if distributed:
    dist.destroy_process_group()
