#!/usr/bin/env bash
# The GPU measurements behind configs/plan/gpu-measurements.toml and the README's GPU figures, in
# one run of about 8 minutes on one H100 or H200 (most of it compilation): GPT-2 124M at 16K
# tokens per step with its kernel breakdown, llama-1b under each activation-checkpointing mode,
# and the planner's predictions for both. Every command has its own time limit and the run goes
# on past a failure; OUT_DIR/summary.txt lists each command's exit status.
#
#   scripts/gpu-check.sh OUT_DIR        (from the repository root, torch with CUDA installed)
set -uo pipefail

out=${1:?usage: scripts/gpu-check.sh OUT_DIR}
command -v nvidia-smi >/dev/null || { echo "scripts/gpu-check.sh: no NVIDIA GPU here (nvidia-smi not found)" >&2; exit 2; }
mkdir -p "$out"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-python3}
cluster=1xH100
nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200 && cluster=1xH200

run() {  # run NAME SECONDS clusterlm-arguments...
    local name=$1 seconds=$2
    shift 2
    timeout "$seconds" "$PYTHON" -m clusterlm "$@" >"$out/$name.txt" 2>&1
    echo "$name: exit $?" | tee -a "$out/summary.txt"
}

nvidia-smi >"$out/nvidia-smi.txt" 2>&1
"$PYTHON" -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())' >"$out/torch.txt" 2>&1
# Both GPU configs read a BPE corpus; the embedded one, tokenized once (GPT-2's vocabulary size).
[ -f data/bpe/manifest.json ] || run prepare 180 prepare --tokenizer bpe --vocab-size 50257 --out data/bpe

bench=(bench train --steps 10 --warmup 3 --rounds 1)
run gpt2-124m 150 "${bench[@]}" --config configs/gpt2-124m.toml --training.tokens_per_step 16384 --breakdown
run gpt2-124m-plan 60 plan --model configs/gpt2-124m.toml --cluster "$cluster" --global-batch-tokens 16384 --seq 1024
# llama-1b at 8192 tokens per sequence, one micro-batch per step: without checkpointing 2 sequences;
# with it the larger micro-batches it makes room for, the larger first, then one smaller.
for spec in none:2 selective:4,2 full:8,4; do
    mode=${spec%%:*}
    for micro in $(echo "${spec#*:}" | tr , ' '); do
        run "llama-1b-$mode-mb$micro" 120 "${bench[@]}" --config configs/llama-1b.toml \
            --training.activation_checkpointing "$mode" --training.micro_batch_size "$micro" \
            --training.tokens_per_step $((micro * 8192))
        grep -q "^llama-1b-$mode-mb$micro: exit 0$" "$out/summary.txt" && break
    done
done
run llama-1b-plan 60 plan --model configs/llama-1b.toml --cluster "$cluster" --global-batch-tokens 16384 --seq 8192
run gpu-data 60 plan --validate --gpu-data
