#!/usr/bin/env bash
# Sweep weight x activation bit widths for one model, then tabulate every finished run.
#
#   scripts/sweep_bits.sh MODEL "WBITS_LIST" "ABITS_LIST" [extra main.py args...]
#
# e.g. scripts/sweep_bits.sh opt-125m "3 4 8" "4,8,16" --ppl_datasets ptb
# Each (w, a) pair runs main.py with --eval_ppl plus the extra arguments into
# $OUT/w{w}a{a} (OUT defaults to out/<model basename>-sweep); pairs whose results.json exists
# are skipped. The table of everything under $OUT goes to $OUT/table.md and stdout.
# PYTHON picks the interpreter (default: the repo's .venv/bin/python).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
BITS=" 2 3 4 5 6 7 8 16 "  # main.py's choices

usage() {
    sed -n '2,10s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"
}

case "${1:-}" in
    -h|--help) usage; exit 0 ;;
esac
if [[ $# -lt 3 ]]; then
    echo "error: need MODEL \"WBITS_LIST\" \"ABITS_LIST\" (e.g. opt-125m \"3 4\" \"4 8\"); see --help" >&2
    exit 2
fi
MODEL="$1"
read -r -a WLIST <<< "${2//,/ }"
read -r -a ALIST <<< "${3//,/ }"
shift 3
check_bits() {  # check_bits wbits|abits VALUE...
    local kind="$1"
    shift
    if [[ $# -eq 0 ]]; then
        echo "error: empty $kind list; give bit widths such as \"4 8\"" >&2
        exit 2
    fi
    for bits in "$@"; do
        if [[ "$BITS" != *" $bits "* ]]; then
            echo "error: $kind $bits is not one of:$BITS" >&2
            exit 2
        fi
    done
}
check_bits wbits ${WLIST[@]+"${WLIST[@]}"}
check_bits abits ${ALIST[@]+"${ALIST[@]}"}
for arg in "$@"; do
    case "$arg" in
        --wbits|--wbits=*|--abits|--abits=*|--output_path|--output_path=*)
            echo "error: $arg is set per grid point by this script; drop it" >&2
            exit 2 ;;
    esac
done
OUT="${OUT:-out/$(basename "$MODEL")-sweep}"
if [[ ! -x "$PYTHON" ]] && ! command -v "$PYTHON" >/dev/null; then
    echo "error: no python at $PYTHON; run 'make install' or set PYTHON=..." >&2
    exit 2
fi

for w in "${WLIST[@]}"; do
    for a in "${ALIST[@]}"; do
        dir="$OUT/w${w}a${a}"
        if [[ -f "$dir/results.json" ]]; then
            echo "skip w${w}a${a}: $dir/results.json exists (delete it to rerun)"
            continue
        fi
        echo "run w${w}a${a}: main.py $MODEL --wbits $w --abits $a --eval_ppl $* --output_path $dir"
        "$PYTHON" "$ROOT/main.py" "$MODEL" --wbits "$w" --abits "$a" --eval_ppl "$@" --output_path "$dir" || {
            rc=$?
            echo "error: w${w}a${a} failed (exit $rc); finished runs are kept, rerun to resume" >&2
            exit "$rc"
        }
    done
done

PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m eval.table "$OUT" --out "$OUT/table.md"
echo "wrote $OUT/table.md"
