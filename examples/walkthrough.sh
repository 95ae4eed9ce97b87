#!/usr/bin/env bash
# A real-data walkthrough on synthetic files in the published layouts, with a tiny model, on a CPU:
#   datasets (EmoSet, Emotion6, WebEmo layouts) -> the paper's EmoSet subset -> a tiny base checkpoint and a teacher
#   -> Cold-Start traces by rejection sampling -> Cold-Start SFT + GRPO with LoRA, trained on EmoSet and on Emotion6
#   -> evaluation in and out of domain -> the merged adapter evaluated on its own -> the paper's two-setting table.
# A smoke walkthrough: every step is the command a real run uses, with tiny sizes; its numbers say nothing about the
# method. README "A real-data walkthrough" shows these commands and the table they printed.
#   bash examples/walkthrough.sh OUT_DIR        (PYTHON=/path/to/python to choose the interpreter)
set -euo pipefail

OUT=${1:?usage: bash examples/walkthrough.sh OUT_DIR}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python}
D=$OUT/data
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this checkout's emor3, for examples/walkthrough_data.py too

# 1. Datasets in their published layouts, and the paper's EmoSet subset drawn from the full split files
$PY examples/walkthrough_data.py layouts "$D" --seed 0
$PY -m emor3.data emoset-subset "$D/EmoSet" "$D/emoset2k" --seed 0 --train 64 --test 32
$PY -m emor3.data validate "$D/Emotion6_train"
$PY -m emor3.data validate "$D/WebEmo/test25.txt" --taxonomy binary

# 2. A random tiny checkpoint, then SFT on EmoScenes' own SET traces: the result stands in for the published
#    instruct checkpoint (Qwen2.5-VL-3B-Instruct), both the model trained below and the teacher of its traces
$PY examples/walkthrough_data.py tiny-model "$OUT/base"
$PY -m emor3.sft --model "$OUT/base" --out "$OUT/teacher" --data.cache-dir "$OUT/cache" \
    --data.emoscenes-train 64 --data.emoscenes-test 8 --data.emoscenes-ood 8 --data.cold-start 64 \
    --sft.steps 250 --sft.batch-size 8 --run.threads 1 --run.progress false

# 3. Cold-Start traces for each training set, by rejection sampling from the teacher (here the instruct model
#    itself; a larger one in practice)
$PY -m emor3.sft traces --teacher "$OUT/teacher/sft" --data "$D/emoset2k" --split train \
    --n 16 --per-image 2 --temperature 0.5 --max-new-tokens 80 --progress false --out "$D/emoset2k_train_traces.jsonl"
$PY -m emor3.sft traces --teacher "$OUT/teacher/sft" --data "$D/Emotion6_train" \
    --n 16 --per-image 2 --temperature 0.5 --max-new-tokens 80 --progress false --out "$D/emotion6_train_traces.jsonl"

# 4. Cold-Start SFT + GRPO (emo_r3) with LoRA, in the paper's two training settings, each evaluated in and out of
#    domain at the end (results.json)
EMOSET=$D/emoset2k/test.jsonl
E6=$D/Emotion6_test
WEBEMO=$D/WebEmo/test25.txt:binary
LORA=(--model.lora-rank 8 --model.lora-alpha 16
      --model.lora-targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj,vision,merger)
SMALL=(--sft.steps 20 --sft.lr 1e-3 --grpo.steps 2 --grpo.lr 1e-3 --grpo.max-new-tokens 64 --eval.max-new-tokens 64
       --run.threads 1 --run.progress false)
$PY -m emor3.grpo.train --config examples/quick.toml --model "$OUT/teacher/sft" "${LORA[@]}" "${SMALL[@]}" \
    --data "$D/emoset2k_train_traces.jsonl" --data.eval "emoset=$EMOSET@in,emotion6=$E6@out,webemo=$WEBEMO@out" \
    --run.out "$OUT/runs/emoset"
$PY -m emor3.grpo.train --config examples/quick.toml --model "$OUT/teacher/sft" "${LORA[@]}" "${SMALL[@]}" \
    --data "$D/emotion6_train_traces.jsonl" --data.eval "emotion6=$E6@in,emoset=$EMOSET@out,webemo=$WEBEMO@out" \
    --run.out "$OUT/runs/emotion6"

# 5. The trained adapter (the last checkpoint, after step 2) folded into a full Hugging Face folder, evaluated on its
#    own: the same scores as the run's
#    emo_r3 row. Without --data, evaluate also builds and scores the EmoScenes splits; the --data.emoscenes-* flags
#    keep them out
$PY -m emor3.models merge "$OUT/runs/emoset/checkpoint-2/adapter" --base "$OUT/runs/emoset/sft" \
    --out "$OUT/merged/emoset"
$PY -m emor3.evaluate --model "$OUT/merged/emoset" --eval-data "emoset=$EMOSET@in,emotion6=$E6@out,webemo=$WEBEMO@out" \
    --data.emoscenes-train 8 --data.emoscenes-test 0 --data.emoscenes-ood 0 --data.cold-start 0 \
    --data.cache-dir "$OUT/cache" --eval.max-new-tokens 64 --run.threads 1 --run.progress false --out "$OUT/eval/emoset"

# 6. The paper's Table 1 layout over the two settings
$PY -m emor3.evaluate table "$OUT/runs/emoset" "$OUT/runs/emotion6" --out "$OUT/table.md"
