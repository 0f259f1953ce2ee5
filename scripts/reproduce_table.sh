#!/usr/bin/env bash
# Reproduce the RPTQ paper's table for one model: one main.py run per row, then one markdown table.
#
#   scripts/reproduce_table.sh [MODEL] [extra main.py args...]
#
# MODEL defaults to opt-1.3b. Every row runs with --eval_ppl plus the extra arguments (e.g.
# --tasks piqa,arc_easy or --ppl_datasets ptb). Row N writes $OUT/N/results.json
# (OUT defaults to out/<model basename>); rows whose results.json exists are skipped, so an
# interrupted reproduction resumes where it stopped. ROWS="FP16 W4A4" selects rows.
# PYTHON picks the interpreter (default: the repo's .venv/bin/python).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
ALL_ROWS="FP16 W4A16 W4A8 W4A4 W4A4KV W4A3KV W3A3KV"

usage() {
    sed -n '2,10s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

row_flags() {  # the paper's bit setting of a row, as main.py flags
    case "$1" in
        FP16)   echo "--wbits 16 --abits 16" ;;
        W4A16)  echo "--wbits 4 --abits 16" ;;
        W4A8)   echo "--wbits 4 --abits 8" ;;
        W4A4)   echo "--wbits 4 --abits 4" ;;
        W4A4KV) echo "--wbits 4 --abits 4 --only_quant_kv" ;;
        W4A3KV) echo "--wbits 4 --abits 3 --only_quant_kv" ;;
        W3A3KV) echo "--wbits 3 --abits 3 --only_quant_kv" ;;
        *) return 1 ;;
    esac
}

case "${1:-}" in
    -h|--help) usage; exit 0 ;;
esac
MODEL="opt-1.3b"
if [[ $# -gt 0 && "$1" != -* ]]; then
    MODEL="$1"
    shift
fi
for arg in "$@"; do
    case "$arg" in
        --wbits|--wbits=*|--abits|--abits=*|--only_quant_kv|--output_path|--output_path=*)
            echo "error: $arg is set per row by this script; drop it (use ROWS=... to pick rows)" >&2
            exit 2 ;;
    esac
done
OUT="${OUT:-out/$(basename "$MODEL")}"
ROWS="${ROWS:-$ALL_ROWS}"
for row in $ROWS; do
    if ! row_flags "$row" >/dev/null; then
        echo "error: unknown row '$row' in ROWS; pick from: $ALL_ROWS" >&2
        exit 2
    fi
done
if [[ ! -x "$PYTHON" ]] && ! command -v "$PYTHON" >/dev/null; then
    echo "error: no python at $PYTHON; run 'make install' or set PYTHON=..." >&2
    exit 2
fi

for row in $ROWS; do
    dir="$OUT/$row"
    if [[ -f "$dir/results.json" ]]; then
        echo "skip $row: $dir/results.json exists (delete it to rerun this row)"
        continue
    fi
    read -r -a flags <<< "$(row_flags "$row")"
    echo "run $row: main.py $MODEL ${flags[*]} --eval_ppl $* --output_path $dir"
    "$PYTHON" "$ROOT/main.py" "$MODEL" "${flags[@]}" --eval_ppl "$@" --output_path "$dir" || {
        rc=$?
        echo "error: row $row failed (exit $rc); finished rows are kept, rerun to resume" >&2
        exit "$rc"
    }
done

PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m eval.table "$OUT" --out "$OUT/table.md"
echo "wrote $OUT/table.md"
