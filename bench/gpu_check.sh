#!/usr/bin/env bash
# The GPU checks behind bench/RESULTS.md's GPU section, on one CUDA GPU, in order of importance:
#   1. pipeline: the default experiment (bench/tiny.yaml, i.e. configs/tiny.yaml) end to end in one
#      process under configs/accelerate/single.yaml: bf16 autocast in PPO, bf16 in the Trainer stages
#   2. zero3: PPO for 10 steps under DeepSpeed ZeRO-3 (configs/accelerate/zero3.yaml, one process, bf16)
#   3. ppo-bench: `bench/run.py --only ppo` (ours vs TRL 1.12.0, fp32, as on CPU) on that pipeline's models
# Each step has a time limit and its own log; a failing step does not stop the later ones. What each step
# did is summed up in $OUT/steps.txt. SECONDS_LEFT bounds the whole script (each step gets at most what is left).
#
#   OUT=bench/out/gpu OURS_PY=.venv/bin/python TRL_PY=bench/.venv/bin/python bench/gpu_check.sh [BENCH_RUNS]
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out/gpu}
OURS_PY=${OURS_PY:-.venv/bin/python}
TRL_PY=${TRL_PY:-bench/.venv/bin/python}
RUNS=${1:-2}
END=$(($(date +%s) + ${SECONDS_LEFT:-100000}))
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
BF16=(stages.pretrain.bf16=true stages.sft.bf16=true stages.reward.bf16=true tracking.wandb=disabled)

step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $OUT/NAME.log, one summary line
    local name=$1 limit=$2 start
    shift 2
    start=$(date +%s)
    ((limit > END - start)) && limit=$((END - start))
    ((limit < 20)) && { echo "$name: skipped, no time left" | tee -a "$OUT/steps.txt"; return; }
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc after $(($(date +%s) - start)) s (limit $limit s)" | tee -a "$OUT/steps.txt"
    tail -n 4 "$OUT/$name.log"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$OURS_PY" -c "import torch, transformers, trl, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available()); print('transformers', transformers.__version__, 'trl', trl.__version__, 'accelerate', accelerate.__version__)"
} 2>&1 | tee "$OUT/steps.txt"

step pipeline 300 "$OURS_PY" -m rlhf.cli run bench/tiny.yaml --launch configs/accelerate/single.yaml "${BF16[@]}"
"$OURS_PY" -m rlhf.cli status bench/tiny.yaml "${BF16[@]}" >>"$OUT/pipeline.log" 2>&1

"$OURS_PY" - <<'EOF' >/tmp/zero3-1gpu.yaml
import yaml
cfg = yaml.safe_load(open("configs/accelerate/zero3.yaml"))
cfg["num_processes"] = 1
print(yaml.safe_dump(cfg))
EOF
step zero3 100 "$OURS_PY" -m rlhf.cli run bench/tiny.yaml --launch /tmp/zero3-1gpu.yaml --until ppo "${BF16[@]}" \
    stages.ppo.num_steps=10

step ppo-bench 200 "$OURS_PY" bench/run.py --only ppo --runs "$RUNS" --ours-python "$OURS_PY" --trl-python "$TRL_PY" \
    --out bench/out/gpu-bench --results "$OUT/RESULTS-gpu.md"
cp bench/out/gpu-bench/results.json "$OUT/results-gpu.json" 2>/dev/null
