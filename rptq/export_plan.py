"""The quantized model in the Hugging Face model's own basis, checked against what compressed-tensors
can express: per quantized linear its fp32 weight, integer-grid scale and zero point in the format's
signed-code convention and its input quantizer; the layer tensors; the points the format drops.

Our blocks may hold channel transforms folded into weights that a plain Hugging Face layer can run
as they are (SmoothQuant/LAE scales, RPTQ's R3/R5 permutations of v/fc1 rows with out_proj/fc2
columns, OPT's R2 q/k rows) and two it cannot: a norm gather (R1/R4: the norm's gamma/beta and its
readers' columns go back to the model's channel order) and Llama's permuted rotary tables (R2: the
q/k rows go back). Every refusal is a one-line UserError naming the reason and the nearest setting
that exports; nothing here writes anything.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from common.errors import UserError
from models.block import QuantBlock
from quant.quantizer import dequantize_weight, expand_groups

from . import export_rules as rules


@dataclass
class LinearPlan:
    """One quantized linear as the format stores it (``zero``/``input_zero``: None when symmetric)."""

    name: str
    weight: torch.Tensor  # fp32, the model's basis: our dequantized weight, bit for bit
    scale: torch.Tensor  # (rows, groups) fp32
    zero: torch.Tensor | None  # (rows, groups) int8 on the format's signed codes
    weight_args: dict
    input_args: dict | None = None
    input_scale: torch.Tensor | None = None
    input_zero: torch.Tensor | None = None


@dataclass
class ExportPlan:
    state: dict[str, torch.Tensor] = field(default_factory=dict)  # every model tensor, fp32, model basis
    linears: list[LinearPlan] = field(default_factory=list)
    dropped: dict[str, str] = field(default_factory=dict)  # point -> what the format leaves out there


def _signed_zero(zero: torch.Tensor, bits: int, grid: str, where: str) -> torch.Tensor | None:
    """Our zero points on the format's codes -2^(b-1) .. 2^(b-1) - 1 (None: symmetric). The full grid's
    codes 0 .. 2^b - 1 shift by 2^(b-1), code and zero alike, so (code - zero) * scale is unchanged; the
    reference grid's codes are already signed. A zero point outside the code range has no b-bit form."""
    if grid in ("symmetric", "quarot"):  # zero 0; quarot also uses code -2^(b-1), which the format has
        if bool(zero.ne(0).any()):
            raise UserError(f"{where}: a symmetric grid with a non-zero zero point; re-run the quantization")
        return None
    shifted = zero - 2 ** (bits - 1) if grid == "full" else zero
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    if bool(((shifted < low) | (shifted > high)).any()):
        bad = float(shifted[(shifted < low) | (shifted > high)][0])
        raise UserError(f"{where}: a zero point ({bad:g} on signed {bits}-bit codes) lies outside the format's "
                        f"range {low}..{high} (a group whose range excludes 0 on the {grid} grid); use "
                        "--w_range with_zero --grid full")
    return shifted.to(torch.int8)


def _weight_args(bits: int, grid: str, group: int | None) -> dict:
    strategy = {"strategy": "group", "group_size": group} if group else {"strategy": "channel"}
    return {"num_bits": bits, "type": "int", "symmetric": grid in ("symmetric", "quarot"), **strategy}


def _regroup(per_column: torch.Tensor, group: int | None) -> torch.Tensor | None:
    """(rows, cols) per-column values -> (rows, cols / group), or None unless constant within each group."""
    grouped = per_column.unflatten(1, (-1, group or per_column.shape[1]))
    first = grouped[..., :1]
    return first.squeeze(-1) if bool(grouped.eq(first).all()) else None


def _linear(name: str, where: str, codes: dict | None, weight: torch.Tensor, rows: torch.Tensor | None,
            cols: torch.Tensor | None) -> LinearPlan:
    if codes is None or "codes" not in codes and codes.get("kind") != "binary":
        raise UserError(f"{where}: no integer codes were kept (a checkpoint stores such a weight as a float "
                        "tensor); re-run the quantization with --export")
    if codes.get("kind") == "binary":
        raise UserError(f"{where}: " + rules.BINARY_CODED.format(q="gptqt/bcq"))
    bits, grid, sizes = int(codes["bits"]), codes["grid"], codes.get("group_sizes")
    scale, zero = codes["scale"].float(), codes["zero"].float()
    ours = dequantize_weight(codes["codes"], scale, zero, sizes)  # quant.grid's fp32 arithmetic
    if not torch.equal(ours.to(weight.dtype), weight.cpu()):
        raise UserError(f"{where}: the kept integer codes do not reproduce the weight; re-run the quantization")
    sizes = sizes or (weight.shape[1],)
    if len(set(sizes)) > 1 or weight.shape[1] % sizes[0]:
        raise UserError(f"{where}: " + rules.CLUSTER_GROUPS.format(points="its input"))
    group = sizes[0] if len(sizes) > 1 else None
    per_col_scale, per_col_zero = expand_groups(scale, sizes), expand_groups(zero, sizes)
    if rows is not None:
        ours, per_col_scale, per_col_zero = ours[rows], per_col_scale[rows], per_col_zero[rows]
    if cols is not None:
        ours, per_col_scale, per_col_zero = ours[:, cols], per_col_scale[:, cols], per_col_zero[:, cols]
    g_scale, g_zero = _regroup(per_col_scale, group), _regroup(per_col_zero, group)
    if g_scale is None or g_zero is None:
        raise UserError(f"{where}: " + rules.NORM_GATHER.format(points="R1/R4"))
    return LinearPlan(name, ours.contiguous(), g_scale.contiguous(), _signed_zero(g_zero, bits, grid, where),
                      _weight_args(bits, grid, group))


def _input(plan: LinearPlan, spec, tap, where: str) -> None:
    """The linear's input quantizer as the format's input activations (nothing when FP)."""
    if spec is None or not spec.enabled:
        return
    if spec.unit_grid or spec.group_sizes is not None:
        raise UserError(f"{where}: " + rules.CLUSTER_RANGES.format(points="its input"))
    if spec.dynamic == "sequence":
        raise UserError(f"{where}: " + rules.PER_SEQUENCE)
    if spec.clip != 1.0 or spec.clip_low not in (None, 1.0):
        raise UserError(f"{where}: " + rules.CLIPPED.format(clip=spec.clip if spec.clip != 1.0 else spec.clip_low))
    symmetric = spec.grid in ("symmetric", "quarot")
    plan.input_args = {"num_bits": spec.bits, "type": "int", "symmetric": symmetric,
                       "strategy": "token" if spec.dynamic else "tensor", "dynamic": bool(spec.dynamic)}
    if not spec.dynamic:
        plan.input_scale = tap.scale.detach().float().cpu().reshape(1)
        plan.input_zero = _signed_zero(tap.zero.detach().float().cpu().reshape(1), spec.bits, spec.grid,
                                       f"{where} input")


def _row_order(index: torch.Tensor | None, head_dim: int) -> torch.Tensor | None:
    """Llama's rotary gathers (heads, head_dim): our row h*d + j is the model's row h*d + index[h, j]."""
    if index is None:
        return None
    rows = (torch.arange(index.shape[0]).unsqueeze(1) * head_dim + index.cpu()).flatten()
    return torch.argsort(rows)


def plan_block(plan: ExportPlan, block: QuantBlock, prefix: str, layer: int) -> None:
    """Add one decoder block's tensors and quantized linears to ``plan`` in the model's basis."""
    spec = block.spec
    for point, steps in block.online.items():
        if len(steps):
            raise UserError(f"layer {layer} runs a transform online at {point} (a rotation, or a scale that could "
                            "not fold into a weight), and the format has no online transforms; use --transforms "
                            "smooth with --smooth_points norm")
    state = dict(block.layer.state_dict())
    cols, rows = {}, {}
    for edge in spec.norm_edges:  # undo the gather: gamma/beta and the readers' columns in the model's order
        perm = block.gathers.get(edge.point)
        if perm is None:
            continue
        inverse = torch.argsort(perm.cpu())
        for key in (f"{edge.norm}.weight", f"{edge.norm}.bias"):
            if key in state:
                state[key] = state[key][inverse.to(state[key].device)]
        cols.update({name: inverse for name in edge.linears})
    head_dim = spec.heads.head_dim
    for name, attr in ((spec.qk_edge.q, "q_rope_index"), (spec.qk_edge.k, "k_rope_index")):
        order = _row_order(getattr(block, attr, None), head_dim)
        if order is not None:
            rows[name] = order
            if f"{name}.bias" in state:
                state[f"{name}.bias"] = state[f"{name}.bias"][order.to(state[f"{name}.bias"].device)]
    for name, point in spec.linear_inputs.items():
        where = f"layer {layer} {name}"
        weight = state[f"{name}.weight"]
        linear = _linear(f"{prefix}.{name}", where, block.weight_codes.get(name), weight, rows.get(name),
                         cols.get(name))
        state[f"{name}.weight"] = linear.weight
        _input(linear, getattr(block.taps[point], "spec", None), block.taps[point], where)
        plan.linears.append(linear)
    inputs = set(spec.linear_inputs.values())
    for point, tap in block.taps.items():
        qspec = getattr(tap, "spec", None)
        if point not in inputs and qspec is not None and qspec.enabled:
            plan.dropped[point] = "1/255 grid" if qspec.unit_grid else f"{qspec.bits}-bit"
    plan.state.update({f"{prefix}.{k}": v.detach().float().cpu() for k, v in state.items()})


def plan_export(model, adapter) -> ExportPlan:
    """The whole model: resident tensors as they are, every decoder block through :func:`plan_block`."""
    if getattr(adapter, "export_unsupported", ""):
        raise UserError(adapter.export_unsupported)
    plan = ExportPlan()
    path = adapter.layers_path
    plan.state.update({k: v.detach().float().cpu() for k, v in model.state_dict().items()
                       if not k.startswith(path + ".")})
    for i, block in enumerate(adapter.layers(model)):
        if not isinstance(block, QuantBlock):
            raise UserError(rules.NOT_QUANTIZED)
        plan_block(plan, block, f"{path}.{i}", i)
    if not plan.linears:
        raise UserError(rules.NOT_QUANTIZED)
    return plan
