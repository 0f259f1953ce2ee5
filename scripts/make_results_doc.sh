#!/usr/bin/env bash
# Generate docs/results.md for smollm2-135m entirely from scripted runs (no hand-typed numbers).
#
#   scripts/make_results_doc.sh
#
# Runs (each skipped when its results.json exists, so an interrupted run resumes):
#   $OUT/ppl/<ROW>        the paper's 7 rows via scripts/reproduce_table.sh, PTB + wiki_leads ppl,
#                         plus W4A4 per-tensor, W4A4 uniform and W4A4 uniform per-tensor
#   $OUT/tasks/<name>     zero-shot accuracies (local task data) for FP16, W4A4, W4A4 per-tensor
#   $OUT/ref/fp16-5x512   FP16 PTB ppl on the first 5 windows of 512 tokens (checked by the tests)
# then renders the tables with `python -m eval.table` and writes DOC atomically with python -m eval.results_doc.
# Environment: OUT (default out/results-smollm2), DOC (default docs/results.md), PPL_LIMIT (24),
# TASK_LIMIT (40), PYTHON (default .venv/bin/python). On a CPU shared with other jobs, OMP_NUM_THREADS=1
# avoids thread oversubscription (it is recorded per run in the doc's wall-time table).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
case "${1:-}" in
    -h|--help) sed -n '2,14s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 0 ;;
esac
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHON="${PYTHON:-.venv/bin/python}"
OUT="${OUT:-out/results-smollm2}"
DOC="${DOC:-docs/results.md}"
PPL_LIMIT="${PPL_LIMIT:-24}"
TASK_LIMIT="${TASK_LIMIT:-40}"
MODEL=smollm2-135m
PAPER_ROWS="FP16 W4A16 W4A8 W4A4 W4A4KV W4A3KV W3A3KV"
CALIB=(--calib_dataset ptb --nsamples 16 --seqlen 512 --seed 2 --no_progress)
PPL_ARGS=(--ppl_datasets ptb,wiki_leads "${CALIB[@]}" --limit "$PPL_LIMIT")
TASK_ARGS=(--tasks piqa,arc_easy,arc_challenge,openbookqa,boolq --tasks_source local "${CALIB[@]}"
           --limit "$TASK_LIMIT")
REF_ARGS=(--wbits 16 --abits 16 --eval_ppl --ppl_datasets ptb --limit 5 --seqlen 512 --seed 2 --no_progress)

mkdir -p "$OUT"
STEPS="$OUT/steps.tsv"  # name, wall seconds, finished at, OMP_NUM_THREADS; one line per run actually executed
COMMANDS="$OUT/commands.txt"  # every command of this script, shell-quoted, whether run or skipped
: > "$COMMANDS.tmp"
script_start=$(date +%s)

record() {  # name, command...: note the command; run it unless its results.json exists; log its wall time
    local name=$1 results=$2; shift 2
    printf '%q ' "$@" | sed 's/ $//; s/\\,/,/g' >> "$COMMANDS.tmp"  # %q escapes commas needlessly
    echo >> "$COMMANDS.tmp"
    if [[ -f "$results" ]]; then
        echo "skip $name: $results exists"
        return
    fi
    echo "== $name: $*"
    local t0=$SECONDS
    "$@"
    printf '%s\t%s\t%s\t%s\n' "$name" "$((SECONDS - t0))" "$(date -u +%FT%TZ)" "${OMP_NUM_THREADS:-}" >> "$STEPS"
}

# 1. the paper's rows, one reproduce_table.sh call per row so each row's wall time is logged
for row in $PAPER_ROWS; do
    record "ppl/$row" "$OUT/ppl/$row/results.json" \
        env ROWS="$row" OUT="$OUT/ppl" scripts/reproduce_table.sh "$MODEL" "${PPL_ARGS[@]}"
done
# 2. extra W4A4 rows: per-tensor baseline, uniform abits policy, and both
extra() {  # name, flags...
    local name=$1; shift
    record "ppl/$name" "$OUT/ppl/$name/results.json" \
        "$PYTHON" main.py "$MODEL" --wbits 4 --abits 4 "$@" --eval_ppl "${PPL_ARGS[@]}" --output_path "$OUT/ppl/$name"
}
extra W4A4-per-tensor --reorder ""
extra W4A4-uniform --abits_policy uniform
extra W4A4-uniform-per-tensor --abits_policy uniform --reorder ""
# 3. zero-shot tasks for a subset (no --eval_ppl: the ppl of these settings is in the table above)
task_run() {  # name, flags...
    local name=$1; shift
    record "tasks/$name" "$OUT/tasks/$name/results.json" \
        "$PYTHON" main.py "$MODEL" "$@" "${TASK_ARGS[@]}" --output_path "$OUT/tasks/$name"
}
task_run FP16 --wbits 16 --abits 16
task_run W4A4 --wbits 4 --abits 4
task_run W4A4-per-tensor --wbits 4 --abits 4 --reorder ""
# 4. the reference figure the slow test re-computes
record "ref/fp16-5x512" "$OUT/ref/fp16-5x512/results.json" \
    "$PYTHON" main.py "$MODEL" "${REF_ARGS[@]}" --output_path "$OUT/ref/fp16-5x512"

# 5. tables and the document
mv "$COMMANDS.tmp" "$COMMANDS"
"$PYTHON" -m eval.table "$OUT/ppl" --out "$OUT/ppl/table.md" > /dev/null
"$PYTHON" -m eval.table "$OUT/tasks" --out "$OUT/tasks/table.md" > /dev/null
"$PYTHON" -m eval.results_doc --out-dir "$OUT" --doc "$DOC" --model "$MODEL" \
    --invocation-s "$(($(date +%s) - script_start))" --ppl-limit "$PPL_LIMIT" --task-limit "$TASK_LIMIT"
echo "wrote $DOC"
