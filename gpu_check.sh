#!/usr/bin/env bash
# Everything only a GPU can show, in one run of at most 10 minutes on one H100 or H200:
#   1. test_gpu.py: QLoRA (NF4) on CUDA, a bf16 RL step of train.py with and without 4-bit weights, generation
#      in bf16, a converted VLM-RLAIF-layout checkpoint generated and evaluated on CUDA, bench_gpu.py's tiny path;
#   2. bench_gpu.py at tiny shapes, bf16 and QLoRA;
#   3. bench_gpu.py at the paper's shapes (LLaMA-7B + CLIP ViT-L/14-336, random weights, 50 frames, G = 5),
#      bf16 + LoRA and QLoRA: step time by phase, generated tokens/s, peak memory, beside the estimate;
#   4. one FSDP2 step over NCCL in one process (torchrun --nproc_per_node=1 bench_gpu.py --fsdp=True).
# Each check has its own time limit, so one that hangs cannot take the others' minutes; a failed check is
# recorded and the rest still run. Writes results/bench_gpu.json (every check's figures and exit status)
# and the logs to results/gpu_check/ ($GPU_CHECK_JSON and $GPU_CHECK_DIR move them). Exit status: the number
# of failed checks.
#
#   bash gpu_check.sh          # on the GPU machine
#   bash gpu_check.sh --cpu    # the CPU-safe parts (tiny shapes, gloo): what CI runs (test_paper_setting.py)
set -u
cd "$(dirname "$0")"
LOGS=${GPU_CHECK_DIR:-results/gpu_check}
RECORD=${GPU_CHECK_JSON:-results/bench_gpu.json}
mkdir -p "$LOGS" "$(dirname "$RECORD")"
rm -f "$LOGS"/*.json
failed=0

check() {   # check NAME SECONDS COMMAND...: run it with a time limit, log it, remember its exit status
  local name=$1 limit=$2; shift 2
  local start=$(date +%s)
  timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local status=$?
  echo "{\"check\": \"$name\", \"exit\": $status, \"seconds\": $(( $(date +%s) - start ))}" >"$LOGS/$name.status.json"
  [ $status -eq 0 ] || failed=$((failed + 1))
  echo "gpu_check: $name exit $status after $(( $(date +%s) - start )) s (log: $LOGS/$name.log)"
}

if [ "${1:-}" = "--cpu" ]; then
  check tiny_cpu 300 python3 bench_gpu.py --cpu_smoke=True --out_json="$LOGS/tiny_cpu.json"
  check fsdp_gloo 300 python3 -m torch.distributed.run --standalone --nproc_per_node=1 bench_gpu.py \
      --cpu_smoke=True --fsdp=True --out_json="$LOGS/fsdp_gloo.json"
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$LOGS/gpu.txt" 2>&1
  check test_gpu 100 python3 -m pytest -q -x test_gpu.py
  check tiny_bf16 40 python3 bench_gpu.py --tiny=True --dtype=bfloat16 --out_json="$LOGS/tiny_bf16.json"
  check tiny_qlora 40 python3 bench_gpu.py --tiny=True --dtype=bfloat16 --load_in_4bit=True \
      --out_json="$LOGS/tiny_qlora.json"
  check fsdp_nccl 40 python3 -m torch.distributed.run --standalone --nproc_per_node=1 bench_gpu.py --tiny=True \
      --dtype=bfloat16 --fsdp=True --out_json="$LOGS/fsdp_nccl.json"
  # the random 7B-shaped parts are written once (bf16) by the first of these and reused by the second
  check paper_qlora 200 python3 bench_gpu.py --load_in_4bit=True --steps=2 --out_json="$LOGS/paper_qlora.json"
  check paper_bf16 150 python3 bench_gpu.py --steps=2 --out_json="$LOGS/paper_bf16.json"
fi

python3 - "$LOGS" "$RECORD" <<'EOF'
import glob, json, os, sys, time
logs, record_path = sys.argv[1], sys.argv[2]
checks = {}
for path in sorted(glob.glob(os.path.join(logs, "*.status.json"))):
    status = json.load(open(path))
    figures = os.path.join(logs, status["check"] + ".json")
    checks[status["check"]] = {**status, "result": json.load(open(figures)) if os.path.exists(figures) else None}
gpu = open(os.path.join(logs, "gpu.txt")).read().strip() if os.path.exists(os.path.join(logs, "gpu.txt")) else "none"
record = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "gpu": gpu, "checks": checks}
with open(record_path, "w") as f:
    json.dump(record, f, indent=1)
print(f"gpu_check: {sum(c['exit'] != 0 for c in checks.values())} of {len(checks)} checks failed; wrote {record_path}")
EOF
exit $failed
