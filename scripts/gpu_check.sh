#!/usr/bin/env bash
# GPU check: the runtime's equivalence tests on CUDA (SDPA, and FlashAttention-2 when importable;
# float32 and bfloat16) and a short bench with synchronised timing, on a CUDA machine.
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
echo "gpu check written to $out"
