#!/usr/bin/env bash
# Rebuild the embedded default from scratch and measure it, as docs/model_card.md reports:
#   1. train the tiny preset on the shapes world (the data is generated first), then the mask
#      refiner alone on top of it, then the referring re-ranker alone on top of that, then the
#      scene captioner (traced captions) alone on top of that,
#   2. evaluate it on a held-out test split (another seed) with `pixelllm eval`, every task, and
#      break referring localization down by expression form and object size (and count how often
#      the object is among the pointer's first peaks), and probe how much
#      of each object's shape the image features carry, and how region captions fare with boxes
#      that are not tight,
#   3. copy the checkpoint (weights, config, tokenizer; no trainer state) into the package.
set -euo pipefail
cd "$(dirname "$0")/.."
base=runs/shapes_tiny  # where the later stages' configs find the earlier ones
run=runs/shapes_tiny_scene
test_split=${TEST_SPLIT:-runs/shapes_test}

pixelllm train --config configs/shapes_tiny.yaml --out "$base"
pixelllm train --config configs/shapes_tiny_masks.yaml --out runs/shapes_tiny_masks
pixelllm train --config configs/shapes_tiny_refer.yaml --out runs/shapes_tiny_refer
pixelllm train --config configs/shapes_tiny_scene.yaml --out "$run"

if [ ! -f "$test_split/summary.json" ]; then
  python -c "from pixelllm.data.synthetic import generate; generate('$test_split', 500, seed=1, split='test')"
fi
mkdir -p "$run/eval"
for task in refer refseg regioncap densecap trace; do
  pixelllm eval --model "$run/last" --task "$task" --data "$test_split" --json \
    --report "$run/eval/$task.md" --per-sample "$run/eval/$task.jsonl" | tee "$run/eval/$task.json"
done
python scripts/refer_breakdown.py "$run/eval/refer.jsonl" "$test_split" | tee "$run/eval/refer_breakdown.md"
python scripts/pointer_recall.py "$run/last" "$run/eval/refer.jsonl" | tee "$run/eval/pointer_recall.md"
python scripts/shape_probe.py "$run/last" "$base/data/train" "$test_split" | tee "$run/eval/shape_probe.md"
python scripts/region_boxes.py "$run/last" "$test_split" | tee "$run/eval/region_boxes.md"

mkdir -p pixelllm/assets/default
cp "$run"/last/{config.json,model.safetensors,tokenizer.json,tokenizer_config.json} pixelllm/assets/default/
# safetensors writes its files readable by their owner only; the package's files are for everyone
chmod 644 pixelllm/assets/default/*
