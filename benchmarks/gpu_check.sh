#!/usr/bin/env bash
# The prepared GPU check (issues 16, 28): see benchmarks/gpu_check.py; it writes results/gpu/<gpu kind>.json|md
# (what `kdbench plan --gpu <kind>` reads). Run from anywhere:
#   OUT=/some/dir benchmarks/gpu_check.sh          # on the GPU machine (~8 minutes)
#   benchmarks/gpu_check.sh --dry --out /tmp/gc    # tiny sizes on the CPU (also KDBENCH_GPU_CHECK_DRY=1)
# kdbench runs from this checkout (PYTHONPATH), with whatever torch the machine has.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" >/dev/null; then  # packages the machine lacks, carried as wheels
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/gpu_check_site .whl/*.whl &&
        export PYTHONPATH="$PYTHONPATH:/tmp/gpu_check_site"
fi
exec python3 benchmarks/gpu_check.py "$@"
