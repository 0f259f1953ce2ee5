#!/usr/bin/env bash
# The README's demo: RPTQ W4A4 on the real pretrained SmolLM2-135M (shipped in a PyPI package),
# PTB perplexity, full precision vs quantized vs the per-tensor baseline, side by side.
# Then copies the runs' results.json to docs/runs/demo/ and rewrites the README's demo table from them.
# Demo-sized so it finishes in a few minutes on 2 CPU cores; the paper's protocol uses
# --nsamples 128 --seqlen 2048 and the whole evaluation split.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-out/demo}
DEMO_ARGS=(--eval_ppl --ppl_datasets ptb --calib_dataset ptb --nsamples 16 --seqlen 512 --limit 40 --seed 2
           --no_progress)
echo "demo settings: ${DEMO_ARGS[*]}"
DIGEST="$("$PYTHON" -c 'from common.provenance import code_digest; print(code_digest())')"
run() {  # name, flags...: skipped only when its results were made by this command and this quantization code
  local name=$1 stamp; shift
  stamp="$* ${DEMO_ARGS[*]} $DIGEST"
  if [[ "$(cat "$OUT/$name/.made_by" 2>/dev/null)" != "$stamp" ]]; then
    rm -rf "${OUT:?}/$name"  # another command's or other code's results (and resume state) must not be reused
  elif [[ -f "$OUT/$name/results.json" ]]; then
    echo "skip $name: $OUT/$name/results.json made by this command and code"; return
  fi  # else: same command and code, interrupted: main.py resumes from its calibration state
  mkdir -p "$OUT/$name" && printf '%s\n' "$stamp" > "$OUT/$name/.made_by"
  echo "== $name: main.py smollm2-135m $*"
  "$PYTHON" main.py smollm2-135m "$@" "${DEMO_ARGS[@]}" --output_path "$OUT/$name"
}
run fp16 --wbits 16 --abits 16
run w4a4-rptq --wbits 4 --abits 4
run w4a4-per-tensor --wbits 4 --abits 4 --reorder ""
"$PYTHON" -m eval.table "$OUT" --out "$OUT/table.md"
# The README's demo table is generated from these runs: their small results.json files are committed under
# docs/runs/demo/ (the plots and logs stay in $OUT), then the README's demo block is rewritten from them.
DOCS=${DOCS:-docs/runs/demo}
for name in fp16 w4a4-rptq w4a4-per-tensor; do
  mkdir -p "$DOCS/$name"
  cp "$OUT/$name/results.json" "$DOCS/$name/results.json.tmp"
  mv "$DOCS/$name/results.json.tmp" "$DOCS/$name/results.json"  # a reader sees the old file or the new one
done
"$PYTHON" -m docgen.readme_blocks --write
