#!/usr/bin/env bash
# Regenerate every figure the docs show, in the order that gets the compared rows first; resumable (each step skips
# what is stored and current), so run it again after an interruption, in this session or the next.
#
#   scripts/regenerate_evidence.sh            # SmolLM2, its peer runs, Gemma 3 270M, its peer runs, then timing
#   STEPS="smollm2 peer-smollm2" scripts/regenerate_evidence.sh
#
# Steps: smollm2 (scripts/make_results_doc.sh), peer-smollm2 (scripts/peer/llmcompressor.py, seeds 2 3 4), gemma
# (MODEL=gemma3-270m scripts/make_results_doc.sh), peer-gemma, timing (ours vs the peer's W4A16 calibration, back
# to back: it needs the machine to itself, so it comes last, after everything else has finished).
# The peer runs alongside the regeneration's two jobs would slow both, so the steps run one after another.
# Each step runs a copy of its script from out/ (bash reads a script as it runs it, so an edited script would
# derail a running generation). PEER_VENV: the peer's venv (out/peer-venv; created when missing).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
case "${1:-}" in
    -h|--help) sed -n '2,13s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 0 ;;
esac
STEPS="${STEPS:-smollm2 peer-smollm2 gemma peer-gemma timing}"
PEER_VENV="${PEER_VENV:-out/peer-venv}"
PYTHON="${PYTHON:-.venv/bin/python}"
mkdir -p out
COPY="out/make_results_doc.$$.sh"  # this invocation's own copy (out/ is the repository's, so ROOT stays right)
cp scripts/make_results_doc.sh "$COPY"
trap 'rm -f "$COPY"' EXIT

for step in $STEPS; do
    echo "=== $step ($(date -u +%FT%TZ))"
    case $step in
        smollm2) bash "$COPY" ;;
        gemma) MODEL=gemma3-270m bash "$COPY" ;;
        peer-smollm2) "$PYTHON" scripts/peer/llmcompressor.py --venv "$PEER_VENV" ;;
        peer-gemma) "$PYTHON" scripts/peer/llmcompressor.py --venv "$PEER_VENV" --model gemma3-270m ;;
        timing) "$PYTHON" scripts/peer/llmcompressor.py --venv "$PEER_VENV" --timing --seeds 2 ;;
        *) echo "error: unknown step '$step'; pick from: smollm2 peer-smollm2 gemma peer-gemma timing" >&2; exit 2 ;;
    esac
done
"$PYTHON" -m docgen.results_doc >/dev/null
"$PYTHON" -m docgen.readme_blocks --write
