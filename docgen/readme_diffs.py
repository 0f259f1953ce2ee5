"""The README's "Differences from the reference" table: the descriptive columns kept here as text, the measured
column (default → alternative, with the ratio) computed from docs/runs/diffs and the default rows, and the
lines under it (the windows used, where the default W4A4 run's activation error sits)."""
from __future__ import annotations

from dataclasses import dataclass
from statistics import mean

from docgen.readme_data import NOT_RUN, measure, ratio, settings_line, show

CONFIGS = ("W4A4", "W4A3KV")  # each alternative ran on both; their defaults are ppl/W4A4 and ppl/W4A3KV
DYNAMIC_DEFAULT = "a-dynamic"  # per-token dynamic ranges compare with the reference's dynamic ranges


@dataclass(frozen=True)
class Item:
    item: str
    reference: str  # the reference's behaviour = our default
    alternative: str
    run: str = ""  # the alternative's run suffix under docs/runs/diffs/<config>-; "" = nothing measured
    unmeasured: str = "—"  # the measured column when nothing is measured, in words


ITEMS = (
    Item("integer grid", "2^b levels over [min, max − step], signed codes, zero = round(−(max+min)/2s)",
         "`--grid full` (2^b − 1 steps over [min, max])", "grid-full"),
    Item("grid clamps", "reference code: scale clamped to [1e-4, 1e4], zero to ±1e4, which clips every "
         "single-channel weight cluster with |w| > 1 to ~1; ours: scale floor 1e-8, no zero clamp (a deliberate "
         "default: the clamps collapse SmolLM2)", "`--grid reference_clamped` (the reference code's clamps)",
         "grid-clamped"),
    Item("weight ranges", "plain min/max per (row × cluster)", "`--w_range with_zero` (GPTQ's convention)",
         "w-range-with-zero"),
    Item("`--metric ema_minmax`", "EMA (0.99) over calibration samples of each sample's *cluster* extreme, from "
         "sample 0", "`--metric ema_channel` (EMA per channel, then the cluster extreme: narrower)",
         "metric-ema-channel"),
    Item("`--metric ema_minmax`", "as above", "`--metric minmax` (the extremes over all calibration tokens)",
         "metric-minmax"),
    Item("`--metric mse` (the reference's flag)", "(reference: a per-sample search, overwritten each sample)",
         "`--metric mse`: per-cluster clipping search on 2048 calibration rows", "metric-mse"),
    Item("`--metric ema_minmax`", "as above", "`--metric layer_mse` (per-point clipping ratio minimising the "
         "block's output MSE)", "metric-layer-mse"),
    Item("k-means features", "running global min/max over all samples, whatever `--metric`",
         "`--kmeans_features metric`", "kmeans-metric"),
    Item("R2 features", "q at q_proj's output, before OPT's 1/√d", "none (a fix; the old tap-scaled q weighed q "
         "by 1/8–1/11 against k)", unmeasured="OPT only (Llama taps unscaled q); no OPT weights offline"),
    Item("`--a_dynamic`", "one range per cluster and *sequence*; softmax stays on its fixed grid",
         "`--a_dynamic_method per_token`", "a-dynamic-per-token"),
    Item("softmax P", "round(255·p)/255 always, also in the statistics pass (ranges and Hessians downstream see "
         "the rounded P)", "`--calib_softmax fp` (statistics on the unrounded P)", "calib-softmax-fp"),
    Item("next block's calibration inputs", "this block's quantized outputs after weights were quantized, else its "
         "calibration-pass outputs (`--block_inputs weights`)", "`--block_inputs quantized` (always the quantized "
         "outputs)", unmeasured="only where weights stay unquantized (W16Ax): not in these configurations"),
    Item("zero-shot metric", "tables show acc_norm for piqa, ARC, OpenBookQA; acc for boolq, LAMBADA (header "
         "names it)", "results.json keeps every metric"),
    Item("BOS in lm-eval contexts", "none for OPT (the reference's lm-eval 0.3); the model's own for Llama",
         "`--task_bos on/off`", unmeasured="OPT only; no OPT weights offline"),
    Item("LAMBADA offline", "`lambada_openai` refused offline", "`lambada_flat` (paragraph breaks collapsed: a "
         "different number)"),
    Item("k-means seed", "`random_state=0` (`--kmeans_seed 0`), whatever `--seed`", "`--kmeans_seed 2` (seeded "
         "like the windows)", "kmeans-seed-2"),
    Item("cluster order", "k-means' label order (the reference's argsort of the labels)", "`--cluster_order "
         "feature` (by mean feature; only GPTQ's column order differs)", "cluster-order-feature"),
    Item("`--w_quantizer normal`", "reference: a silent no-op", "ours: RTN that really quantizes"),
    Item("`mix` calibration", "reference: 126 real windows + 2 all-zero rows", "ours: exactly `--nsamples` real "
         "windows"),
)


def default_key(config: str, item: Item) -> str:
    """The run an alternative is compared with: the paper row, or the reference's dynamic ranges."""
    return f"diffs/{config}-{DYNAMIC_DEFAULT}" if item.run == "a-dynamic-per-token" else f"ppl/{config}"


def measured(item: Item, tree: dict[str, list[dict]]) -> str:
    """'W4A4 157.04 → 147.86 (×0.94); W4A3KV ...' on PTB, one part per configuration, 'not run' where absent."""
    if not item.run:
        return item.unmeasured
    parts = []
    for config in CONFIGS:
        base = measure(tree.get(default_key(config, item)), "ptb")
        alt = measure(tree.get(f"diffs/{config}-{item.run}"), "ptb")
        if alt is None:
            parts.append(f"{config} {NOT_RUN}")
        elif base is None:
            parts.append(f"{config} default {NOT_RUN} → {show(alt)}")
        else:
            parts.append(f"{config} {show(base)} → {show(alt)} ({ratio(alt, base)})")
    return "; ".join(parts)


def activation_error_line(tree: dict[str, list[dict]]) -> str:
    """The two activation points with the largest mean (over layers) relative error in the default W4A4 run."""
    runs = tree.get("ppl/W4A4") or []
    layers = runs[0].get("layer_errors") or [] if runs else []
    values: dict[str, list[float]] = {}
    for layer in layers:
        for point, err in (layer.get("points") or {}).items():
            values.setdefault(point, []).append(err)
    if len(values) < 2:
        return "The per-point activation errors of the default W4A4 run: not run."
    (first, a), (second, b) = sorted(((p, mean(v)) for p, v in values.items()), key=lambda pv: -pv[1])[:2]
    return (f"In the default W4A4 run (`layer_errors` of its results.json) the activation point with the largest "
            f"mean relative error over the layers is `{first}` ({a:.1e}), next `{second}` ({b:.1e}).")


def differences_block(tree: dict[str, list[dict]]) -> str:
    lines = ["| item | reference behaviour = our default | alternative | measured (SmolLM2 PTB ppl, default → "
             "alternative) |", "|---|---|---|---|"]
    for item in ITEMS:
        cells = (item.item, item.reference, item.alternative, measured(item, tree))
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    used = [r for key, runs in tree.items() if key.split("/")[0] in ("diffs", "ppl") for r in runs]
    settings = settings_line(used)
    lines += ["", "Windows: " + (settings if settings else f"{NOT_RUN} yet (`scripts/make_results_doc.sh`)")
              + "; default W4A4 = `python main.py smollm2-135m --wbits 4 --abits 4` with those windows. "
              "± = sample std over calibration seeds where several ran.", "", activation_error_line(tree)]
    return "\n".join(lines) + "\n"
