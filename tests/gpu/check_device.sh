#!/usr/bin/env bash
# What one GPU can show about srpo-ray's GPU paths, in under 3 minutes; every step prints
# PASS, FAIL or SKIP with a reason (tests/gpu/check_device.py says what each covers).
#
#   bash tests/gpu/check_device.sh            # part 1 (torch steps, the learner) + part 2 (vLLM + Ray)
#   bash tests/gpu/check_device.sh --part 1   # only what needs no vLLM and no Ray
#
# A step whose packages are missing is skipped with their names: with torch alone the
# torch steps still run, from this checkout, without installing it. On a machine without
# CUDA every step is skipped (exit 0). Exit status 1 when a step failed.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
[ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ] && PY=.venv/bin/python
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false
exec timeout 180 "$PY" tests/gpu/check_device.py "$@"
