"""What a compressed-tensors export can express, decided from the flags alone: the one-line refusals
``--export`` gives before any model is loaded, each naming the reason and the nearest exportable setting.

The format stores, per quantized linear, integer weights on one affine grid per output row (or per
fixed-size group of input columns) and, optionally, one quantizer on the linear's input: one range
per tensor (static) or per token (dynamic). It has no online transforms, no per-cluster or
per-sequence activation ranges, no group index for non-contiguous groups (compressed-tensors 0.19
removed it) and no binary-coded weights. Everything the flags cannot decide (zero points outside the
format's code range, the groups of a loaded checkpoint) is checked on the model itself by rptq.export.
"""
from __future__ import annotations

from . import methods
from .config import FP, QuantConfig
from .methods.rptq import reorders

FORMATS = ("compressed-tensors",)
# Reorder points whose permutation reaches a linear's input columns (R2 only permutes q/k rows).
_COLUMN_REORDERS = ("R1", "R3", "R4", "R5")
_NORM_REORDERS = ("R1", "R4")  # gathered at the norm's input, which a Hugging Face norm cannot do

NOT_QUANTIZED = ("the weights are not quantized (--wbits 16 or --disable_w_quant), so there are no integer weights "
                 "to store; use --wbits 8, 4, 3 or 2")
BINARY_CODED = ("binary-coded weights (offset + sum of alpha_i b_i, --w_quantizer {q}) are not integers on an affine "
                "grid, which is all the format stores; use --w_quantizer gptq (or rtn)")
ONLINE = ("online rotations or transforms (the {step} step) run at inference and the format has no online "
          "transforms; use --transforms smooth (SmoothQuant's scales fold into the weights)")
CLUSTER_GROUPS = ("weight groups are the input point's clusters ({points} reordered, --w_group_size 0), of variable "
                  "size; the format has fixed-size groups: use --w_group_size N (e.g. 128)")
NORM_GATHER = ("the {points} reorder gathers the norm's input, which the Hugging Face model cannot: the readers' "
               "columns go back to the model's order, where their groups of --w_group_size are no longer contiguous "
               "(compressed-tensors has no group index); reorder only R2/R3/R5 (e.g. --reorder 35) or per-row weights")
CLUSTER_RANGES = ("RPTQ's per-cluster activation ranges ({points} reordered) have no place in the format (one range "
                  "per tensor or per token); use --reorder \"\" for per-tensor ranges, --method smoothquant, or "
                  "--abits 16 for weight-only")
PER_SEQUENCE = ("per-sequence dynamic ranges (--a_dynamic_method per_cluster) are not in the format, whose dynamic "
                "ranges are per token; use --a_dynamic_method per_token")
CLIPPED = ("clipped dynamic activation ranges (--act_clip {clip}) are not in the format, whose dynamic ranges are the "
           "token's full range; use --act_clip 1")


def export_refusal(q: QuantConfig) -> str | None:
    """Why the flags alone rule the export out (None: they do not; the model is checked when exported)."""
    if q.weight_bits >= FP:
        return NOT_QUANTIZED
    if q.w_quantizer in ("gptqt", "bcq"):
        return BINARY_CODED.format(q=q.w_quantizer)
    online = [s for s in q.transforms if methods.step(s).online]
    if online:
        return ONLINE.format(step=online[0])
    column_reorders = [r for r in _COLUMN_REORDERS if reorders(q, r)]
    norm_reorders = [r for r in _NORM_REORDERS if reorders(q, r)]
    if column_reorders and q.w_group_size == 0:
        also = (" with --reorder limited to R2/R3/R5 (e.g. --reorder 35: R1/R4 gather the norm input)"
                if norm_reorders else "")
        return CLUSTER_GROUPS.format(points="/".join(column_reorders)) + also
    if norm_reorders and q.w_group_size > 0:
        return NORM_GATHER.format(points="/".join(norm_reorders))
    if q.act_bits >= FP or q.only_quant_kv:  # K/V are inside attention: not in the format, dropped with a note
        return None
    if q.abits_policy in ("rptq", "uniform"):
        if column_reorders:
            return CLUSTER_RANGES.format(points="/".join(column_reorders))
        if q.a_dynamic and q.a_dynamic_method == "per_cluster":
            return PER_SEQUENCE
    if methods.policy(q).uses_act_clip and q.act_clip < 1:
        return CLIPPED.format(clip=q.act_clip)
    return None
