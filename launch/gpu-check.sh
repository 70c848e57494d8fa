#!/usr/bin/env bash
# bench's GPU paths on one CUDA machine, in one go (what a CPU machine cannot check): the GPU tests (nccl,
# CUDA events and memory, MFU, bf16, compile, the profiler's kernels and memory snapshot), a hung NCCL rank's
# flight recorder dump, the flight recorder's cost per NCCL call, and a preset filling the GPU (Llama 3.2 1B,
# strategy=single and fsdp on one GPU) with its predicted memory beside the measured.
#   OUT=/tmp/gpu bash launch/gpu-check.sh        # every step's log and results land under $OUT
set -u
OUT=${OUT:-results/gpu-check}
mkdir -p "$OUT/logs"
step() {  # step <name> <timeout_s> <command...>: run, log, go on whatever happens
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/logs/$name.txt" 2>&1
  echo "$name: exit $? in $((SECONDS - start)) s" | tee -a "$OUT/steps.txt"
}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
step env 60 bash -c 'nvidia-smi; python3 -c "import torch, transformers; print(torch.__version__, torch.version.cuda, torch.cuda.nccl.version(), transformers.__version__)"'

# 1. the GPU tests
step test_gpu 240 python3 -m pytest -q -p no:cacheprovider tests/integration/test_gpu.py -rA

# 2. a hung rank on NCCL: its stack and its flight recorder, read by torch's analyser
step hang 90 python3 -m bench strategy=ddp device=cuda steps=100000 warmup=2 fault.rank=0 fault.step=3 \
  fault.kind=hang timeout_s=45 flight_recorder_entries=2000 progress=false "results_dir=$OUT/hang"
cat > /tmp/fr_world1.py <<'PY'
import json, torch, torch.distributed as dist
from torch._C import _distributed_c10d as c10d
torch.cuda.set_device(0)
dist.init_process_group("nccl", device_id=torch.device("cuda:0"))
t = torch.ones(1024, device="cuda")
dist.all_reduce(t)
torch.cuda.synchronize()
dump = json.loads(c10d._dump_fr_trace_json())
print("entries:", [(e["profiling_name"], e["collective_seq_id"], e["state"]) for e in dump.get("entries", [])])
dist.destroy_process_group()
PY
step fr_world1 60 env TORCH_FR_BUFFER_SIZE=100 torchrun --nproc-per-node 1 /tmp/fr_world1.py
step fr_trace 30 bash -c "python3 -m torch.distributed.flight_recorder.fr_trace $OUT/hang/*/*/collectives --prefix rank -j"

# 3. what the flight recorder costs per NCCL call: 4 KiB all-reduces, recorder off and on, interleaved
cat > /tmp/fr_cost.py <<'PY'
import os, time, torch, torch.distributed as dist
torch.cuda.set_device(0)
dist.init_process_group("nccl", device_id=torch.device("cuda:0"))
t = torch.ones(1024, device="cuda")
for _ in range(500): dist.all_reduce(t)
torch.cuda.synchronize()
runs = []
for _ in range(5):
    start = time.perf_counter()
    for _ in range(5000): dist.all_reduce(t)
    torch.cuda.synchronize()
    runs.append((time.perf_counter() - start) / 5000 * 1e6)
print(f"TORCH_FR_BUFFER_SIZE={os.environ.get('TORCH_FR_BUFFER_SIZE', '0')}: {sorted(runs)[2]:.2f} us per all_reduce (median of 5 x 5000)")
dist.destroy_process_group()
PY
for i in $(seq 1 "${FR_COST_REPEATS:-3}"); do for fr in 0 2000; do
  step "fr_cost_${fr}_$i" 60 env TORCH_FR_BUFFER_SIZE=$fr TORCH_NCCL_TRACE_BUFFER_SIZE=$fr torchrun --nproc-per-node 1 /tmp/fr_cost.py
done; done

# 4. a preset filling the GPU: predicted (before the run, `predicted_peak_mem_mb`) against measured memory
for strategy in single fsdp; do
  step "llama_$strategy" 240 python3 -m bench model=llama3.2-1b strategy=$strategy device=cuda precision=bf16 \
    optim.name=adamw global_batch=12 steps=8 warmup=3 progress=false "results_dir=$OUT/preset"
done
grep -h "" "$OUT"/logs/fr_cost_* 2>/dev/null | grep us > "$OUT/fr_cost.txt"
# what comes back: the logs, rows and small files in one archive (the device tool returns few files)
(cd "$OUT" && tar czf all.tgz --exclude='*.pt' --exclude='traces' --exclude='.cache' logs steps.txt hang preset 2>/dev/null)
cat "$OUT/steps.txt"
