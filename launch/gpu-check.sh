#!/usr/bin/env bash
# Everything one CUDA GPU can check of bench, in one go, within one device call (BUDGET_S, under 10 minutes):
# bench beside torchtitan on the same GPU (compile off, then on), tests/integration/test_gpu.py, every strategy
# that runs on one GPU (parity against one device), bf16 + compile + activation checkpointing, profile=true with
# its kernel breakdown and a memory snapshot, a preset filling the GPU (Llama 3.2 1B, single and fsdp) with the
# memory predicted before each run beside the measured, and bench.plan.check's prediction errors.
#   OUT=/tmp/gpu bash launch/gpu-check.sh     # every step's log and results land under $OUT; all.tgz holds them
#   SMOKE=1 OUT=/tmp/gpu-smoke bash launch/gpu-check.sh   # the same steps on a CPU, tiny sizes: the plumbing only
# Steps run most informative first; a step starts only with 30 s of the budget left and never runs past it, and
# steps.txt says which were cut. The GPU machine has no network: build the wheels it lacks here, into .whl/
# (git-ignored), and carry .whl to it:
#   bash ../shared/tools/gpu/wheels.sh        # hydra-core, omegaconf, antlr4, submitit
#   pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl torchtitan==0.3.0 \
#     spmd_types==0.2.3 tyro==1.0.17 docstring-parser==0.18.0 typeguard==4.6.1 typing_extensions==4.16.0
# and there, first: python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
#   export PYTHONPATH=/tmp/site:$PWD
set -u
OUT=${OUT:-results/gpu-check}
BUDGET_S=${BUDGET_S:-560}
SMOKE=${SMOKE:-0}
PY=${PY:-python3}
mkdir -p "$OUT/logs"
: >"$OUT/steps.txt"
step() {  # step <name> <cap_s> <command...>: run with min(cap, budget left) as its limit, log, go on whatever happens
  local name=$1 cap=$2; shift 2
  local left=$((BUDGET_S - SECONDS)) start=$SECONDS
  if ((left < 30)); then echo "$name: skipped, ${left} s of the budget left" | tee -a "$OUT/steps.txt"; return; fi
  timeout "$((cap < left ? cap : left))" "$@" >"$OUT/logs/$name.txt" 2>&1
  echo "$name: exit $? in $((SECONDS - start)) s" | tee -a "$OUT/steps.txt"
}
if [ "$SMOKE" = 1 ]; then
  DEVICE=cpu; SMALL="model=gpt global_batch=8"; PRESET="model=gpt ++model.n_layers=4 global_batch=8"
  TITAN="--tiny --device cpu"; SNAPSHOT=false
else
  DEVICE=cuda; SMALL="model=gpt-125m global_batch=8"; PRESET="model=llama3.2-1b global_batch=12"
  TITAN="--device cuda"; SNAPSHOT=true
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
ON_DEVICE="device=$DEVICE progress=false"

step env 30 bash -c "nvidia-smi; $PY -c 'import torch, transformers; print(torch.__version__, torch.version.cuda, \
torch.cuda.nccl.version() if torch.cuda.is_available() else None, transformers.__version__)'; $PY -m pip list 2>/dev/null \
| grep -iE '^(torch|torchtitan|transformers|hydra-core|omegaconf) '"

# 1. bench beside torchtitan: the same Llama 3 8B-wide model, sequence, batch, bf16, FSDP on one GPU
step vs_torchtitan 270 $PY benchmarks/vs_torchtitan.py $TITAN --compile both --out "$OUT/vs_torchtitan"

# 2. the GPU tests (skipped without CUDA; compile is step 4's), in one process: the image may lack pytest-xdist
step test_gpu 120 $PY -m pytest -q -o addopts="" -p no:cacheprovider tests/integration/test_gpu.py -rA -k "not compile"

# 3. every strategy that runs on one GPU, each against the single-device run (verify=true in parity's terms: fp32,
# SGD, whose tolerance is tight; AdamW's normalisation amplifies last-bit differences on near-zero gradients)
step strategies 120 $PY -m bench -m $ON_DEVICE strategy=single,ddp,fsdp,zero,tensor,pipeline,modelparallel,dataparallel \
  $SMALL steps=10 warmup=3 verify=true "results_dir=$OUT/strategies"

# 4. bf16 + compile + activation checkpointing under FSDP; then the profiler's kernel breakdown and a CUDA memory
# snapshot
step features 90 $PY -m bench $ON_DEVICE strategy=fsdp $SMALL precision=bf16 optim.name=adamw compile=true \
  activation_checkpointing=true steps=12 warmup=4 "results_dir=$OUT/features"
step profile 60 $PY -m bench $ON_DEVICE strategy=fsdp $SMALL precision=bf16 optim.name=adamw profile=true \
  profile.memory=$SNAPSHOT steps=8 warmup=3 "results_dir=$OUT/profile"
# FSDP2's CPU offload (shards, gradients and optimizer state in host memory; the step includes the copies), against
# one device, and ZeRO-2 beside it: the step time each costs
step offload 90 $PY -m bench -m $ON_DEVICE strategy=fsdp $SMALL strategy.offload=true,false \
  strategy.reshard_after_forward=false steps=8 warmup=3 verify=true "results_dir=$OUT/offload"

# 5. a preset filling the GPU: the memory predicted before each run (predicted_peak_mem_mb) beside the measured,
# and the plan's predictions against both runs
step preset 120 $PY -m bench -m $ON_DEVICE strategy=single,fsdp $PRESET precision=bf16 optim.name=adamw steps=8 \
  warmup=3 "results_dir=$OUT/preset"
step plan_check 40 $PY -m bench.plan.check $PRESET precision=bf16 optim.name=adamw device=$DEVICE \
  "plan.world_sizes=[1]" "plan.strategies=[single,fsdp]" "results_dir=$OUT/preset"

# what comes back: the logs, rows and small files in one archive (the device tool returns few files)
(cd "$OUT" && tar czf all.tgz --exclude='*.pt' --exclude='*.pickle' --exclude='traces' --exclude='.cache' \
  --exclude='.parity-reference' logs steps.txt vs_torchtitan strategies features profile offload preset 2>/dev/null)
cat "$OUT/steps.txt"
