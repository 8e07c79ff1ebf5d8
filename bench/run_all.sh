#!/usr/bin/env bash
# Rerun every benchmark and rewrite docs/benchmarks.md.
#
#   bench/run_all.sh                      # bundled default model for the end-to-end runs
#   MODEL=path/to/model.onnx bench/run_all.sh
#   REPEATS=3 SIZES="1024 2048" bench/run_all.sh
#
# Uses the project's venv (.venv, or $PYTHON). The first run also creates
# bench/.venv-tiatoolbox (about 2 minutes; see bench/README.md). Runs under `nice -n 5`.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
REPEATS=${REPEATS:-5}
read -r -a SIZE_ARGS <<< "${SIZES:-1024 2048 4096}"

nice -n 5 "$PY" bench/make_maps.py --sizes "${SIZE_ARGS[@]}"
nice -n 5 "$PY" bench/postprocess.py --sizes "${SIZE_ARGS[@]}" --repeats "$REPEATS"

e2e=(bench/end_to_end.py)
if [[ -n "${MODEL:-}" ]]; then
    e2e+=(--model "$MODEL")
fi
if [[ -n "${NOTE:-}" ]]; then
    e2e+=(--note "$NOTE")
fi
status=0
nice -n 5 "$PY" "${e2e[@]}" || status=$?
if [[ $status -eq 2 ]]; then
    echo "end-to-end skipped: no model (set MODEL=...)" >&2
elif [[ $status -ne 0 ]]; then
    echo "end-to-end: some slides failed (see bench/results/end_to_end.json)" >&2
fi
# The API under load while the bundled model analyses whole slides in the embedded queue.
nice -n 5 "$PY" bench/service_load.py --model default --roi none \
    --json bench/results/service_load.json || echo "service load: errors (see the JSON)" >&2
"$PY" bench/report.py
