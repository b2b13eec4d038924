#!/usr/bin/env bash
# The device runs of issue 38 (docs/benchmarks.md, 2026-12-07), from the repository root on a GPU
# machine with torch and transformers; $OUT: where the logs go (default: .).
#   caption34b: the llava-v1.6-34b-shaped captioner on three-frame videos, the caption rule's
#               configured options (config/paper.yaml captions:), batch from the memory plan
#               (needs about 130 GiB: one H200; polars wheels in .whl when not installed)
#   fft:        FFT's step with every item slot and with the slots holding an item, profiled, and
#               the experiments beside it (host-side slots, no compile, CUDA graph trees per layer)
#   slotgraphs: FFT's step as one CUDA graph per bucket of slots holding an item, beside today's
#   compile:    FFT's step compiled and not, with torch.compile's counters (graph breaks, fallbacks)
#   auto:       caption34b on a card of more than 100 GiB, else fft
set -u
OUT=${OUT:-.}
export PYTHONPATH=src:benchmarks${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
date -u

caption34b() {
    if ! python3 -c "import polars" 2>/dev/null; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
        export PYTHONPATH=$PYTHONPATH:/tmp/site
    fi
    PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True timeout "${LIMIT:-515}" python3 benchmarks/caption_speed.py \
        --model llava-34b --prompts video --options static/sdpa_gqa/2 --video-batch auto --new-tokens 300 --e2e-batches 2 2>&1 \
        | grep -v "min_new_tokens" | tee "$OUT/caption34b.log"
}

fft() {
    local base="python3 benchmarks/baselines_speed.py --method fft --steps 30 --no-validation --profile 6"
    for a in "--item-slots all --compile" "--item-slots real --compile" "--item-slots real --compile --host-slots" \
             "--item-slots real" "--item-slots real --compile --host-slots --layer-mode reduce-overhead"; do
        echo "== $a"
        # shellcheck disable=SC2086
        timeout 200 $base $a 2>&1 | grep -v "^USDT" | tail -2 | tee -a "$OUT/fft.jsonl"
    done
}

# compile: FFT's step (slots holding an item) compiled as the workflow compiles it and not at all,
#          with what torch.compile did (graphs, breaks, failures that ran eagerly)
compile() {
    for a in "--item-slots real --compile" "--item-slots real"; do
        echo "== $a"
        # shellcheck disable=SC2086
        TORCH_LOGS=graph_breaks timeout 240 python3 benchmarks/baselines_speed.py --method fft --steps 30 --no-validation $a 2>&1 \
            | grep -v "^USDT" | tail -40 | tee -a "$OUT/compile.log"
    done
}

# slotgraphs: FFT's step (slots holding an item) as the workflow runs it, then the whole step one CUDA
#             graph per bucket of slots holding an item (--slot-graphs), compiled and not; under the
#             machine's transformers and under the one in .whl-tf (5.25: no attention mask built
#             for ViT inside a capture), which is installed into /tmp/site when given
slotgraphs() {
    local base="python3 benchmarks/baselines_speed.py --method fft --steps 30 --no-validation --item-slots real"
    echo "== machine's transformers: --compile"
    timeout 150 $base --compile 2>&1 | grep -v "^USDT" | tail -1 | tee -a "$OUT/slotgraphs.jsonl"
    if ls .whl-tf/*.whl >/dev/null 2>&1; then
        for w in .whl-tf/*.whl; do
            python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "$w" 2>/dev/null || echo "skipped $w"
        done
        export PYTHONPATH=/tmp/site:$PYTHONPATH
    fi
    python3 -c "import transformers; print('transformers', transformers.__version__)"
    for a in "--compile" "--compile --slot-graphs" "--slot-graphs"; do
        echo "== $a"
        # shellcheck disable=SC2086
        timeout 200 $base $a 2>&1 | grep -v "^USDT" | tail -3 | tee -a "$OUT/slotgraphs.jsonl"
    done
}

mode=${1:-auto}
if [ "$mode" = auto ]; then
    gib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
    if [ "${gib:-0}" -gt 102400 ]; then mode=caption34b; else mode=fft; fi
fi
echo "mode: $mode"
"$mode"
date -u
