#!/usr/bin/env bash
# The prepared GPU check: whoever has an NVIDIA GPU runs this once, as it is, from the repository root:
#
#     bash scripts/gpu_check.sh            # figures in bench-out/gpu_check.json (or $OUT/ when set)
#
# 1. Python: $PYTHON, else python3. CuPy is used as installed when it imports and sees a GPU; otherwise
#    it is installed from its wheel with the CUDA libraries (pip install ".[gpu]"). Wheels in .whl/ (for
#    a machine without a package index) are installed first, with no index.
# 2. The GPU tests (tests/test_gpu.py, and the CLI's --device gpu test) must run, not skip.
# 3. scripts/gpu_check.py: forward pass and full lens (with and without sub-rows) at gpt2-xl shape,
#    T = 1024, random weights, the card named, the lens's FLOP/s beside CuPy's own float32 product on
#    the same shapes; one JSON. About 3-5 minutes on a current card, most of it writing the checkpoint.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
out_dir="${OUT:-bench-out}"
mkdir -p "$out_dir"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" MPLBACKEND=Agg HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

echo "== the card"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "(no nvidia-smi)"

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    echo "== installing the wheels in .whl/ (no index)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpt2np-site .whl/*.whl
    export PYTHONPATH="$PYTHONPATH:/tmp/gpt2np-site"
fi
have() { "$PY" - "$@" <<'PY' 2>/dev/null
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
PY
}
if ! "$PY" -c "import sys; sys.path.insert(0, '.'); from gpt2np import backend; backend.gpu()" 2>/dev/null; then
    echo "== installing CuPy with its CUDA libraries (pip install .[gpu])"
    "$PY" -m pip install -q ".[gpu]"
fi
for dep in numpy safetensors tiktoken huggingface_hub matplotlib pytest array_api_strict; do
    have "$dep" || "$PY" -m pip install -q "$dep"
done
"$PY" -c "from gpt2np import backend; cp = backend.gpu(); print('CuPy', cp.__version__, 'sees', cp.cuda.runtime.getDeviceCount(), 'GPU(s)')"

echo "== the GPU tests (a skip is a failure here)"
set +e
"$PY" -m pytest -q -rs tests/test_gpu.py tests/test_cli.py -k "gpu or GPU" 2>&1 | tee "$out_dir/gpu_tests.log"
rc=${PIPESTATUS[0]}
set -e
if grep -q "^SKIPPED" "$out_dir/gpu_tests.log"; then
    echo "GPU CHECK FAILED: GPU tests were skipped although a GPU is present" >&2
    rc=1
fi

echo "== forward and lens at gpt2-xl shape, T = 1024"
"$PY" scripts/gpu_check.py --shape gpt2-xl --T 1024 --out "$out_dir/gpu_check.json"
echo "== GPU tests exit status: $rc"
exit "$rc"
