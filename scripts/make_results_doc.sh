#!/usr/bin/env bash
# Generate docs/results.md entirely from scripted runs (no hand-typed numbers).
#
#   scripts/make_results_doc.sh
#
# Runs (each skipped when its results.json exists, so an interrupted run resumes), all perplexity runs on
# the same calibration windows and the same PPL_LIMIT evaluation windows of ptb and wiki_leads:
#   paper    $OUT/ppl/<ROW>      the paper's 7 rows (scripts/reproduce_table.sh) plus W4A4 per-tensor, uniform
#   methods  $OUT/methods/<name> SmoothQuant, FPTQ, DuQuant, Hadamard rotation, naive and RTN baselines
#   weights  $OUT/weights/<name> weight-only 3/2 bits: RTN, GPTQ, GPTQT, BCQ
#   diffs    $OUT/diffs/<name>   W4A4 and W4A3KV with one reference behaviour switched to its alternative
#   tasks    $OUT/tasks/<name>   zero-shot accuracies (local task data) for FP16, W4A4, W4A4 per-tensor
#   ref      $OUT/ref/fp16-5x512 FP16 PTB ppl on the first 5 windows of 512 tokens (checked by the tests)
# then renders the tables (python -m eval.table) and writes DOC atomically (python -m eval.results_doc).
# Environment: OUT (out/results-smollm2), DOC (docs/results.md), MODEL (smollm2-135m), SECTIONS (all of
# "paper methods weights diffs tasks ref"; a section also runs the paper rows it compares with),
# PPL_LIMIT (8), NSAMPLES (16 calibration windows), TASK_LIMIT (40), ROT_STEPS (64; DuQuant's paper default is 256, fewer to fit a 2-core
# CPU), ONLY (space-separated run names, e.g. "methods/W4A4-duquant ppl/W4A8": run just those and render
# the rows that exist), JOBS (2 runs at once; OMP_NUM_THREADS defaults to 1 when JOBS > 1), PLAN_ONLY=1 (print the
# planned runs as SECTION NAME lines and exit), PYTHON (.venv/bin/python). Each run's output goes to
# $OUT/logs/<name>.log; steps.tsv logs each run's wall time.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
case "${1:-}" in
    -h|--help) sed -n '2,22s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 0 ;;
esac
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHON="${PYTHON:-.venv/bin/python}"
OUT="${OUT:-out/results-smollm2}"
DOC="${DOC:-docs/results.md}"
MODEL="${MODEL:-smollm2-135m}"
ALL_SECTIONS="paper methods weights diffs tasks ref"
SECTIONS="${SECTIONS:-$ALL_SECTIONS}"
PPL_LIMIT="${PPL_LIMIT:-8}"
NSAMPLES="${NSAMPLES:-16}"
TASK_LIMIT="${TASK_LIMIT:-40}"
ROT_STEPS="${ROT_STEPS:-64}"
JOBS="${JOBS:-2}"
if (( JOBS > 1 )); then
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # JOBS processes share the cores
fi
for s in $SECTIONS; do
    if [[ " $ALL_SECTIONS " != *" $s "* ]]; then
        echo "error: unknown section '$s' in SECTIONS; pick from: $ALL_SECTIONS" >&2
        exit 2
    fi
done
PAPER_ROWS="FP16 W4A16 W4A8 W4A4 W4A4KV W4A3KV W3A3KV"
CALIB=(--calib_dataset ptb --nsamples "$NSAMPLES" --seqlen 512 --seed 2 --no_progress)
PPL_ARGS=(--ppl_datasets ptb,wiki_leads "${CALIB[@]}" --limit "$PPL_LIMIT")
DIFF_ARGS=(--ppl_datasets ptb "${CALIB[@]}" --limit "$PPL_LIMIT")  # the diffs table compares ptb only
TASK_ARGS=(--tasks piqa,arc_easy,arc_challenge,openbookqa,boolq --tasks_source local "${CALIB[@]}"
           --limit "$TASK_LIMIT")
PLOT_ARGS=(--act_dist_plot --plot_layers mid)
REF_ARGS=(--wbits 16 --abits 16 --eval_ppl --ppl_datasets ptb --limit 5 --seqlen 512 --seed 2 --no_progress)

mkdir -p "$OUT/logs"
STEPS="$OUT/steps.tsv"  # name, wall seconds, finished at, OMP_NUM_THREADS, JOBS; one line per run executed
COMMANDS="$OUT/commands.txt"  # every command of the plan, shell-quoted, whether run, skipped or not selected
script_start=$(date +%s)
NAMES=() CMDS=() QUEUE=()  # every planned run (name, quoted command); indices of those to run

selected() {  # sections...: whether any of them is in SECTIONS
    local s
    for s in "$@"; do [[ " $SECTIONS " == *" $s "* ]] && return 0; done
    return 1
}

plan() {  # "sections using it", name, command...: note the command; queue it when one of the sections is selected
    local sections=$1 name=$2 i; shift 2
    for i in "${!NAMES[@]}"; do [[ "${NAMES[$i]}" == "$name" ]] && return; done
    NAMES+=("$name")
    CMDS+=("$(printf '%q ' "$@" | sed 's/ $//; s/\\,/,/g')")  # %q escapes commas needlessly
    # shellcheck disable=SC2086
    if selected $sections && { [[ -z "${ONLY:-}" ]] || [[ " $ONLY " == *" $name "* ]]; }; then
        QUEUE+=("$((${#NAMES[@]} - 1))")
    fi
    if [[ -n "${PLAN_ONLY:-}" ]]; then echo "$sections $name"; fi
}

main_run() {  # "sections", name (also the output directory under OUT), flags...
    local sections=$1 name=$2; shift 2
    plan "$sections" "$name" "$PYTHON" main.py "$MODEL" "$@" --output_path "$OUT/$name"
}

# paper: the paper's rows, one reproduce_table.sh call per row; the other sections compare with some of them
for row in $PAPER_ROWS; do
    case $row in
        FP16) users="paper methods weights" ;;
        W4A8) users="paper methods" ;;
        W4A4) users="paper methods diffs" ;;
        W4A3KV) users="paper diffs" ;;
        *) users=paper ;;
    esac
    extra=()
    [[ $row == W4A4 ]] && extra=("${PLOT_ARGS[@]}")  # the figures docs/results.md embeds
    plan "$users" "ppl/$row" env ROWS="$row" OUT="$OUT/ppl" scripts/reproduce_table.sh "$MODEL" "${PPL_ARGS[@]}" \
        "${extra[@]}"
done
main_run "paper methods" ppl/W4A4-per-tensor --wbits 4 --abits 4 --reorder "" --eval_ppl "${PPL_ARGS[@]}" \
    "${PLOT_ARGS[@]}"
main_run "paper methods" ppl/W4A4-uniform --wbits 4 --abits 4 --abits_policy uniform --eval_ppl "${PPL_ARGS[@]}"
main_run paper ppl/W4A4-uniform-per-tensor --wbits 4 --abits 4 --abits_policy uniform --reorder "" \
    --eval_ppl "${PPL_ARGS[@]}"

# methods: each method's preset (see the README), on the same windows
m() { main_run methods "methods/$1" "${@:2}" --eval_ppl "${PPL_ARGS[@]}"; }
m W8A8-smoothquant --method smoothquant
m W8A8-smoothquant-per-token --method smoothquant --a_dynamic
m W4A8-fptq --method fptq
m W4A8-fptq-gptq --method fptq --w_quantizer gptq
m W4A8-naive --wbits 4 --abits 8 --reorder "" --w_quantizer rtn
m W4A16-g128-rtn --wbits 4 --abits 16 --w_quantizer rtn --w_group_size 128 --grid full
m W4A4-duquant --method duquant --rotation_steps "$ROT_STEPS"
m W4A4-rotation --method rotation
m W4A4-duquant-clusters --method duquant --transforms smooth,rotate,qk_rotate,reorder --abits_policy uniform \
    --rotation_steps "$ROT_STEPS"

# weights: weight-only binary coding against RTN and GPTQ, per output row and in groups of 128
for bits in 3 2; do
    for q in rtn gptq gptqt bcq; do
        main_run weights "weights/W$bits-$q" --wbits "$bits" --abits 16 --reorder "" --grid full --w_range minmax \
            --w_quantizer "$q" --eval_ppl "${PPL_ARGS[@]}"
    done
    for q in gptq gptqt; do
        main_run weights "weights/W$bits-$q-g128" --wbits "$bits" --abits 16 --reorder "" --grid full \
            --w_range minmax --w_quantizer "$q" --w_group_size 128 --eval_ppl "${PPL_ARGS[@]}"
    done
done

# diffs: the reference's behaviour (our default) against each alternative, one flag changed
for cfg in W4A4 W4A3KV; do
    case $cfg in W4A4) bits=(--wbits 4 --abits 4) ;; W4A3KV) bits=(--wbits 4 --abits 3 --only_quant_kv) ;; esac
    d() { main_run diffs "diffs/$cfg-$1" "${bits[@]}" "${@:2}" --eval_ppl "${DIFF_ARGS[@]}"; }
    d grid-full --grid full
    d w-range-with-zero --w_range with_zero
    d metric-ema-channel --metric ema_channel
    d metric-minmax --metric minmax
    d metric-mse --metric mse
    d metric-layer-mse --metric layer_mse
    d kmeans-metric --kmeans_features metric
    d a-dynamic --a_dynamic
    d a-dynamic-per-token --a_dynamic --a_dynamic_method per_token
done

# tasks (no --eval_ppl: the ppl of these settings is in the tables) and the reference figure
main_run tasks tasks/FP16 --wbits 16 --abits 16 "${TASK_ARGS[@]}"
main_run tasks tasks/W4A4 --wbits 4 --abits 4 "${TASK_ARGS[@]}"
main_run tasks tasks/W4A4-per-tensor --wbits 4 --abits 4 --reorder "" "${TASK_ARGS[@]}"
main_run ref ref/fp16-5x512 "${REF_ARGS[@]}"

if [[ -n "${PLAN_ONLY:-}" ]]; then exit 0; fi
printf '%s\n' "${CMDS[@]}" > "$COMMANDS"

run_one() {  # index: run one planned command, its output in logs/, its wall time in steps.tsv
    local name=${NAMES[$1]} t0=$SECONDS log="$OUT/logs/${NAMES[$1]//\//_}.log"
    echo "== $name (log: $log)"
    if ! eval "${CMDS[$1]}" > "$log" 2>&1; then
        echo "FAILED $name; last lines of $log:" >&2
        tail -n 15 "$log" >&2
        return 1
    fi
    printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$((SECONDS - t0))" "$(date -u +%FT%TZ)" "${OMP_NUM_THREADS:-}" \
        "$JOBS" >> "$STEPS"  # one short line per write: appends from parallel runs do not interleave
    echo "done $name ($((SECONDS - t0)) s)"
}

failed=0
for i in "${QUEUE[@]}"; do
    if [[ -f "$OUT/${NAMES[$i]}/results.json" ]]; then
        echo "skip ${NAMES[$i]}: results.json exists"
        continue
    fi
    while (( $(jobs -rp | wc -l) >= JOBS )); do
        wait -n || failed=1
    done
    (( failed )) && break  # let the running ones finish, start no more
    run_one "$i" &
done
while (( $(jobs -rp | wc -l) > 0 )); do
    wait -n || failed=1
done
if (( failed )); then
    echo "error: a run failed (see above); finished runs are kept, rerun to resume" >&2
    exit 1
fi

# tables and the document
for sub in ppl tasks; do
    if compgen -G "$OUT/$sub/*/results.json" > /dev/null; then
        "$PYTHON" -m eval.table "$OUT/$sub" --out "$OUT/$sub/table.md" > /dev/null
    fi
done
# With ONLY (a subset of the runs), no section is required whole: each renders the rows that ran ("–" for
# the others).
REQUIRED="$SECTIONS"
[[ -n "${ONLY:-}" ]] && REQUIRED=""
"$PYTHON" -m eval.results_doc --out-dir "$OUT" --doc "$DOC" --model "$MODEL" --sections "$REQUIRED" \
    --invocation-s "$(($(date +%s) - script_start))" --ppl-limit "$PPL_LIMIT" --task-limit "$TASK_LIMIT"
echo "wrote $DOC"
