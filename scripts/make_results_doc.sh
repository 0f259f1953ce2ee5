#!/usr/bin/env bash
# Generate docs/results.md: run what is not stored yet, store each finished run in docs/runs, render the doc.
#
#   scripts/make_results_doc.sh
#
# Every run the document shows is stored as docs/runs/<section>/<run>/{results.json,command.txt} (section: ppl,
# methods, weights, diffs, tasks, ref; results.json stripped small, plus the plot data of the runs a figure
# draws), and the document is rendered from docs/runs alone (python -m docgen.results_doc), so it regenerates on
# any machine. A run is skipped when docs/runs holds its results.json, its command.txt equals the planned
# command and its code digest (versions.code_digest) equals the checkout's (common.provenance.code_digest);
# otherwise it runs into OUT and is stored as soon as it finishes, so an interrupted generation resumes where
# it stopped, across sessions too. Order: FP16, the methods table's rows (seed 2), seeds 3 and 4 of the rows it
# compares (<run>-seed3, <run>-seed4: the spread decides what the doc may call different), zero-shot, the rest,
# and last RPTQ W4A4 once more, alone on the machine, for what one run costs. A second model (MODEL=gemma3-270m)
# gets its own OUT, RUNS (docs/runs-MODEL) and DOC (docs/results-MODEL.md), plans only the sections "paper
# methods tasks", and leaves out the rows its architecture refuses (RUNS/refused.tsv). Settings: SmolLM2-135M, NSAMPLES
# PTB-train calibration windows x 512, PPL_LIMIT windows x 512 of ptb and wiki_leads (diffs: ptb only),
# TASK_LIMIT documents per task.
# Environment: OUT (out/results-smollm2: run directories and logs/), RUNS (docs/runs), DOC (docs/results.md),
# MODEL (smollm2-135m), SECTIONS (all of "paper methods weights diffs tasks ref"), NSAMPLES (32), PPL_LIMIT
# (40), TASK_LIMIT (500), ROT_STEPS (64; DuQuant's paper uses 256), ONLY (space-separated runs, e.g.
# "methods/W4A4-duquant ppl/W4A8": run just those), JOBS (2 runs at once; OMP_NUM_THREADS defaults to 1 when
# JOBS > 1), PLAN_ONLY=1 (print the plan as TIER SECTIONS RUN COMMAND lines, tab-separated, and exit), PYTHON
# (.venv/bin/python). Logs: OUT/logs/<run>.log; RUNS/steps.tsv: each executed run's wall time
# and CPU.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
case "${1:-}" in
    -h|--help) sed -n '2,25s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 0 ;;
esac
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHON="${PYTHON:-.venv/bin/python}"
MODEL="${MODEL:-smollm2-135m}"
ALL_SECTIONS="paper methods weights diffs tasks ref"
if [[ $MODEL == smollm2-135m ]]; then
    OUT="${OUT:-out/results-smollm2}" RUNS="${RUNS:-docs/runs}" DOC="${DOC:-docs/results.md}"
    MODEL_SECTIONS="$ALL_SECTIONS"
else  # a second model: its own tree and doc; RPTQ's reference differences and GPTQT's bits stay on SmolLM2
    OUT="${OUT:-out/results-$MODEL}" RUNS="${RUNS:-docs/runs-$MODEL}" DOC="${DOC:-docs/results-$MODEL.md}"
    MODEL_SECTIONS="paper methods tasks"
fi
SECTIONS="${SECTIONS:-$MODEL_SECTIONS}"
PPL_LIMIT="${PPL_LIMIT:-40}"
NSAMPLES="${NSAMPLES:-32}"
TASK_LIMIT="${TASK_LIMIT:-500}"
ROT_STEPS="${ROT_STEPS:-64}"
JOBS="${JOBS:-2}"
EXTRA_SEEDS="3 4"  # docgen.doc_runs.EXTRA_SEEDS; the base runs use seed 2
if (( JOBS > 1 )); then
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"  # JOBS processes share the cores
fi
for s in $SECTIONS; do
    if [[ " $ALL_SECTIONS " != *" $s "* ]]; then
        echo "error: unknown section '$s' in SECTIONS; pick from: $ALL_SECTIONS" >&2
        exit 2
    fi
done
CALIB=(--calib_dataset ptb --nsamples "$NSAMPLES" --seqlen 512 --seed 2 --no_progress)
PPL_ARGS=(--eval_ppl --ppl_datasets ptb,wiki_leads "${CALIB[@]}" --limit "$PPL_LIMIT")
DIFF_ARGS=(--eval_ppl --ppl_datasets ptb "${CALIB[@]}" --limit "$PPL_LIMIT")  # the diffs table compares ptb only
TASK_ARGS=(--tasks piqa,arc_easy,arc_challenge,openbookqa,boolq --tasks_source local "${CALIB[@]}"
           --limit "$TASK_LIMIT")
PLOT_ARGS=(--act_dist_plot --plot_layers mid)
REF_ARGS=(--wbits 16 --abits 16 --eval_ppl --ppl_datasets ptb --limit 5 --seqlen 512 --seed 2 --no_progress)

declare -A SEEN=()
PLAN=()  # "tier<TAB>sections<TAB>run<TAB>command", command = main.py MODEL flags (no interpreter, no --output_path)

# Rows the model's architecture refuses in one line (main.py would exit 2): left out of the plan and listed in
# RUNS/refused.tsv (run, reason) for the document. Gemma 3: no residual rotation (models/gemma3.py says why).
REFUSED=()
refused_reason() {  # flags... -> the reason this MODEL refuses them, or nothing
    if [[ $MODEL == gemma3* && " $* " =~ " --method "(quarot|spinquant)" "|residual_rotate ]]; then
        echo "Gemma 3's post-attention and post-feedforward norms cannot pass a residual rotation"
    fi
}

plan() {  # tier, "sections using it", run, flags...: note the run once (the first tier that names it wins)
    local tier=$1 sections=$2 name=$3 reason s keep=""; shift 3
    [[ -n "${SEEN[$name]:-}" ]] && return
    SEEN[$name]=1
    for s in $sections; do [[ " $MODEL_SECTIONS " == *" $s "* ]] && keep=1; done
    [[ -z $keep ]] && return  # a section this model's document does not have
    reason="$(refused_reason "$@")"
    if [[ -n $reason ]]; then REFUSED+=("$name"$'\t'"$reason"); return; fi
    PLAN+=("$tier"$'\t'"$sections"$'\t'"$name"$'\t'"$(printf '%q ' main.py "$MODEL" "$@" | sed 's/ $//; s/\\,/,/g')")
}

seeded() {  # tier, sections, run, flags...: the run at seed 2, and at each extra seed (tier 9, section methods,
    # whose table shows the spread) as <run>-seedN, without the plot flags (figures draw seed 2 only)
    local tier=$1 sections=$2 name=$3 seed a; shift 3
    plan "$tier" "$sections" "$name" "$@"
    for seed in $EXTRA_SEEDS; do
        local args=() prev=""
        for a in "$@"; do
            [[ $prev == --seed ]] && a=$seed
            [[ $a == --act_dist_plot || $prev == --plot_layers || $a == --plot_layers ]] || args+=("$a")
            prev=$a
        done
        plan 2 methods "$name-seed$seed" "${args[@]}"
    done
}

# Tier 0-1: FP16 and the methods table's rows (seed 2); tier 2: the extra seeds of the rows it compares (the spread
# decides which differences the doc may call real, so they come before zero-shot and the ablations)
plan 0 "paper methods weights" ppl/FP16 --wbits 16 --abits 16 "${PPL_ARGS[@]}"
plan 0 ref ref/fp16-5x512 "${REF_ARGS[@]}"  # a minute; the tests check the doc's reference figure
seeded 1 "paper methods diffs" ppl/W4A4 --wbits 4 --abits 4 "${PPL_ARGS[@]}" "${PLOT_ARGS[@]}"
seeded 1 "paper methods" ppl/W4A4-uniform --wbits 4 --abits 4 --abits_policy uniform "${PPL_ARGS[@]}"
m() { plan 1 methods "methods/$1" "${@:2}" "${PPL_ARGS[@]}"; }
ms() { seeded 1 methods "methods/$1" "${@:2}" "${PPL_ARGS[@]}"; }
ms W4A4-duquant --method duquant --rotation_steps "$ROT_STEPS"
ms W4A4-rotation --method rotation
ms W4A4-quarot --method quarot "${PLOT_ARGS[@]}"  # its norm-fed points' ranges after R1 (a figure)
ms W4A4-spinquant --method spinquant "${PLOT_ARGS[@]}"
ms W4A4-spinquant-no-learning --method spinquant --spin_steps 0  # control: the learning's own effect
seeded 1 "paper methods" ppl/W4A8 --wbits 4 --abits 8 "${PPL_ARGS[@]}"
ms W4A8-fptq --method fptq
ms W8A8-smoothquant-per-token --method smoothquant --a_dynamic
seeded 1 "paper methods" ppl/W4A16 --wbits 4 --abits 16 "${PPL_ARGS[@]}"
plan 1 "paper methods" ppl/W4A4-per-tensor --wbits 4 --abits 4 --reorder "" "${PPL_ARGS[@]}" "${PLOT_ARGS[@]}"
m W4A4-quarot-rtn --method quarot --w_quantizer rtn
ms W4A4-duquant-gptq --method duquant --w_quantizer gptq --rotation_steps "$ROT_STEPS"  # a best-W4A4 candidate
m W4A4-quarot-reorder --method quarot --transforms residual_rotate,reorder --abits_policy uniform
m W4A4-quarot-duquant --method duquant --transforms residual_rotate,smooth,rotate,qk_rotate \
    --rotation_steps "$ROT_STEPS"
m W4A4-duquant-clusters --method duquant --transforms smooth,rotate,qk_rotate,reorder --abits_policy uniform \
    --rotation_steps "$ROT_STEPS"
m W8A8-smoothquant --method smoothquant
m W4A8-fptq-gptq --method fptq --w_quantizer gptq
m W4A8-naive --wbits 4 --abits 8 --reorder "" --w_quantizer rtn
m W4A16-g128-rtn --wbits 4 --abits 16 --w_quantizer rtn --w_group_size 128 --grid full
# The recipes the peer (scripts/peer/llmcompressor.py) runs, in our flags: symmetric GPTQ in groups of 64, and
# with per-token dynamic 8-bit activations
ms W4A16-gptq-g64 --wbits 4 --abits 16 --reorder "" --w_quantizer gptq --w_group_size 64 --grid symmetric
ms W4A8-gptq-g64-per-token --wbits 4 --abits 8 --reorder "" --w_quantizer gptq --w_group_size 64 --grid symmetric \
    --a_dynamic --a_dynamic_method per_token
# ... and with the peer's column order (--act_order: its GPTQ default), one flag away from GPTQ's paper order
ms W4A16-gptq-g64-act-order --wbits 4 --abits 16 --reorder "" --w_quantizer gptq --w_group_size 64 \
    --grid symmetric --act_order
ms W4A8-gptq-g64-per-token-act-order --wbits 4 --abits 8 --reorder "" --w_quantizer gptq --w_group_size 64 \
    --grid symmetric --a_dynamic --a_dynamic_method per_token --act_order
ms W4A4-flatquant --method flatquant
m W4A4-flatquant-gptq --method flatquant --w_quantizer gptq
ms W4A4-flatquant-best --method flatquant --flat_epochs 8 --w_quantizer gptq --grid full --a_asym --w_group_size 64
ms W4A4-flatquant-best-act-order --method flatquant --flat_epochs 8 --w_quantizer gptq --grid full --a_asym \
    --w_group_size 64 --act_order
m W4A4-duquant-gptq-lwc --method duquant --w_quantizer gptq --w_clip learned --rotation_steps "$ROT_STEPS"
m W4A4-quarot-lwc --method quarot --w_clip learned

# Tier 2: zero-shot (no --eval_ppl: the perplexity of these settings is in the tables)
plan 2 tasks tasks/FP16 --wbits 16 --abits 16 "${TASK_ARGS[@]}"
plan 2 tasks tasks/W4A4 --wbits 4 --abits 4 "${TASK_ARGS[@]}"
plan 2 tasks tasks/W4A4-duquant --method duquant --rotation_steps "$ROT_STEPS" "${TASK_ARGS[@]}"
plan 2 tasks tasks/W8A8-smoothquant-per-token --method smoothquant --a_dynamic "${TASK_ARGS[@]}"

# Tier 3: the rest of the paper's rows, weight-only binary coding, the differences from the reference, the
# reference figure
for row in W4A4KV W4A3KV W3A3KV; do
    case $row in
        W4A4KV) bits=(--wbits 4 --abits 4 --only_quant_kv); users=paper ;;
        W4A3KV) bits=(--wbits 4 --abits 3 --only_quant_kv); users="paper diffs" ;;
        W3A3KV) bits=(--wbits 3 --abits 3 --only_quant_kv); users=paper ;;
    esac
    plan 3 "$users" "ppl/$row" "${bits[@]}" "${PPL_ARGS[@]}"
done
plan 3 paper ppl/W4A4-uniform-per-tensor --wbits 4 --abits 4 --abits_policy uniform --reorder "" "${PPL_ARGS[@]}"
for bits in 3 2; do
    for q in rtn gptq gptqt bcq; do
        plan 3 weights "weights/W$bits-$q" --wbits "$bits" --abits 16 --reorder "" --grid full --w_range minmax \
            --w_quantizer "$q" "${PPL_ARGS[@]}"
    done
    for q in gptq gptqt; do
        plan 3 weights "weights/W$bits-$q-g128" --wbits "$bits" --abits 16 --reorder "" --grid full \
            --w_range minmax --w_quantizer "$q" --w_group_size 128 "${PPL_ARGS[@]}"
    done
done
for cfg in W4A4 W4A3KV; do
    case $cfg in W4A4) bits=(--wbits 4 --abits 4) ;; W4A3KV) bits=(--wbits 4 --abits 3 --only_quant_kv) ;; esac
    d() { plan 3 diffs "diffs/$cfg-$1" "${bits[@]}" "${@:2}" "${DIFF_ARGS[@]}"; }
    d grid-full --grid full
    d grid-clamped --grid reference_clamped
    d w-range-with-zero --w_range with_zero
    d metric-ema-channel --metric ema_channel
    d metric-minmax --metric minmax
    d metric-mse --metric mse
    d metric-layer-mse --metric layer_mse
    d kmeans-metric --kmeans_features metric
    d kmeans-seed-2 --kmeans_seed 2
    d cluster-order-feature --cluster_order feature
    d calib-softmax-fp --calib_softmax fp
    d a-dynamic --a_dynamic
    d a-dynamic-per-token --a_dynamic --a_dynamic_method per_token
done

# Tier 9: what one run costs alone on the machine: RPTQ W4A4's command again, after every other run,
# by itself with all cores (OMP_NUM_THREADS unset); the wall-time section and the settings read its timing
plan 9 ref ref/W4A4-alone --wbits 4 --abits 4 "${PPL_ARGS[@]}"

ORDERED="$(printf '%s\n' "${PLAN[@]}" | sort -s -t$'\t' -k1,1n)"  # by tier, in declaration order within one
if [[ -n "${PLAN_ONLY:-}" ]]; then printf '%s\n' "$ORDERED"; exit 0; fi

mkdir -p "$OUT/logs" "$RUNS"
printf '%s\n' "$ORDERED" > "$RUNS/plan.tsv.tmp" && mv "$RUNS/plan.tsv.tmp" "$RUNS/plan.tsv"
if (( ${#REFUSED[@]} )); then
    printf '%s\n' "${REFUSED[@]}" > "$RUNS/refused.tsv"
else
    rm -f "$RUNS/refused.tsv"
fi
DIGEST="$("$PYTHON" -c 'from common.provenance import code_digest; print(code_digest())')"
CURRENT=" $(cut -f3,4 <<< "$ORDERED" | "$PYTHON" -m docgen.doc_runs current "$RUNS" "$DIGEST" | tr '\n' ' ') "
QUEUE=()  # plan lines to run: selected, not current
while IFS= read -r line; do
    sections=$(cut -f2 <<< "$line") name=$(cut -f3 <<< "$line")
    if [[ "$CURRENT" == *" $name "* ]]; then echo "skip $name: stored, same command and code digest"; continue; fi
    # shellcheck disable=SC2086
    for s in $sections; do
        if [[ " $SECTIONS " == *" $s "* ]] && { [[ -z "${ONLY:-}" ]] || [[ " $ONLY " == *" $name "* ]]; }; then
            QUEUE+=("$line"); break
        fi
    done
done <<< "$ORDERED"

run_one() {  # plan line: run it into OUT, store it in RUNS, log its wall time in RUNS/steps.tsv
    local name cmd t0=$SECONDS log
    name=$(cut -f3 <<< "$1") cmd=$(cut -f4 <<< "$1") log="$OUT/logs/${name//\//_}.log"
    echo "== $name (log: $log)"
    # A run interrupted mid-calibration resumes from OUT/<run>/calibration_state (main.py) when the command and
    # code are the same; one left by other code or another command would be refused there: start it clean.
    # A finished run in OUT that is queued again (its stored copy lacks the figure data of a resumed run) starts
    # clean too: resuming it would skip the layers again.
    if [[ "$(cat "$OUT/$name/.plan" 2>/dev/null)" != "$cmd $DIGEST" || -f "$OUT/$name/results.json" ]]; then
        rm -rf "${OUT:?}/$name"
    fi
    mkdir -p "$OUT/$name" && printf '%s\n' "$cmd $DIGEST" > "$OUT/$name/.plan"
    if ! eval "\"\$PYTHON\" $cmd --output_path \"\$OUT/\$name\"" > "$log" 2>&1; then
        echo "FAILED $name; last lines of $log:" >&2
        tail -n 15 "$log" >&2
        return 1
    fi
    "$PYTHON" -m docgen.doc_runs store "$OUT/$name" "$RUNS/$name" "$cmd"
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$((SECONDS - t0))" "$(date -u +%FT%TZ)" "${OMP_NUM_THREADS:-}" \
        "$JOBS" "$CPU" >> "$RUNS/steps.tsv"  # one short line per write: appends from parallel runs do not interleave
    echo "done $name ($((SECONDS - t0)) s)"
}

CPU="$(sed -n '/^model name/{s/^model name[[:space:]]*: *//p;q;}' /proc/cpuinfo 2>/dev/null || true)"  # in steps.tsv
CPU="${CPU:-unknown}"
if (( ${#QUEUE[@]} )); then  # the machine that runs them, once per distinct machine
    machine="$("$PYTHON" -m docgen.doc_runs machine)"
    grep -qxF -- "$machine" "$RUNS/machines.txt" 2>/dev/null || echo "$machine" >> "$RUNS/machines.txt"
fi
failed=0
for line in "${QUEUE[@]}"; do
    if [[ "$(cut -f1 <<< "$line")" == 9 ]]; then  # alone: wait for the others, then run it with every core
        while (( $(jobs -rp | wc -l) > 0 )); do
            wait -n || failed=1
        done
        (( failed )) && break
        (unset OMP_NUM_THREADS; JOBS=1 run_one "$line") || failed=1
        continue
    fi
    while (( $(jobs -rp | wc -l) >= JOBS )); do
        wait -n || failed=1
    done
    (( failed )) && break  # let the running ones finish, start no more
    run_one "$line" &
done
while (( $(jobs -rp | wc -l) > 0 )); do
    wait -n || failed=1
done

# The document from what is stored, also after a failure (a partial doc lists the rest as not run)
"$PYTHON" -m docgen.results_doc --runs "$RUNS" --doc "$DOC" --model "$MODEL"
echo "wrote $DOC"
if [[ "$RUNS" == docs/runs || "$RUNS" == docs/runs-* ]]; then  # the README's tables read the stored runs
    "$PYTHON" -m docgen.readme_blocks --write
fi
if (( failed )); then
    echo "error: a run failed (see above); finished runs are stored, rerun to resume" >&2
    exit 1
fi
