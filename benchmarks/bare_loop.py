"""The hand-written training loop a user would run instead of bench: no harness, just the work.

    python benchmarks/bare_loop.py --model gpt --steps 60 --warmup 10 --global-batch 32
    torchrun --standalone --nproc-per-node 2 benchmarks/bare_loop.py --model gpt ...

Start it the plain way (plain `python`, plain `torchrun`, the environment you have): that is what bench is
compared with. Same model (bench's own definition, `conf/model/<name>.yaml`), seed, global batch, data shard
and optimizer (SGD, lr 0.01, momentum 0.9) as bench's defaults; DDP when torchrun starts several ranks.
Prints one JSON line on rank 0: samples/s over the steps after the warm-up.
"""

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml
from torch.nn.parallel import DistributedDataParallel

from bench.models import build_model, model_spec

CONF = Path(__file__).resolve().parent.parent / "conf" / "model"

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="mlp")
parser.add_argument("--steps", type=int, required=True)
parser.add_argument("--warmup", type=int, required=True)
parser.add_argument("--global-batch", type=int, default=64)
args = parser.parse_args()

distributed = "RANK" in os.environ
if distributed:
    dist.init_process_group("gloo")
rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)

cfg = yaml.safe_load((CONF / f"{args.model}.yaml").read_text())
torch.manual_seed(0)
model = build_model(cfg)
if distributed:
    model = DistributedDataParallel(model)
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
per_rank = args.global_batch // world
x, y = model_spec(cfg).synthetic_batch(cfg, args.global_batch, torch.Generator().manual_seed(1))
x, y = x[rank * per_rank : (rank + 1) * per_rank], y[rank * per_rank : (rank + 1) * per_rank]

for step in range(args.steps):
    if step == args.warmup:
        start = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    logits = model(x)
    loss = F.cross_entropy(logits.flatten(0, -2), y.flatten())
    loss.backward()
    opt.step()
elapsed = time.perf_counter() - start

if rank == 0:
    measured = args.steps - args.warmup
    print(json.dumps({"samples_per_s": args.global_batch * measured / elapsed}))
if distributed:
    dist.destroy_process_group()
