"""What a run reports besides its numbers: the method it ran, where transforms went, plot data."""
from __future__ import annotations

from pathlib import Path

from common.errors import UserError
from eval.plot_data import write_plot_data as write_point

from . import methods
from .config import QuantConfig


def annotate_transforms(manifest: dict, placements: list[dict]) -> dict:
    """Bit manifest entries gain "transforms": e.g. ["scale@norm", "rotation@online"] for their point."""
    out = {k: dict(v) for k, v in manifest.items()}
    for placed in placements:
        if placed["point"] in out:
            out[placed["point"]].setdefault("transforms", []).append(f"{placed['transform']}@{placed['where']}")
    return out


def plot_layer_set(spec: str, num_layers: int) -> set[int]:
    """--plot_layers '0,mid,-1' -> layer indices."""
    layers = set()
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        if item == "mid":
            layers.add(num_layers // 2)
            continue
        try:
            index = int(item)
        except ValueError:
            raise UserError(f"--plot_layers takes layer numbers, negative from the end, or 'mid' (got {item!r})") \
                from None
        if not -num_layers <= index < num_layers:
            raise UserError(f"--plot_layers {index} is outside the model's {num_layers} layers")
        layers.add(index % num_layers)
    return layers


def write_plot_data(root: Path, report, model: str, method: str) -> list[str]:
    """Per plotted layer and transformed point: channel ranges before and after, in eval.plot_data's format."""
    return [write_point(root, layer, point, tensors, model=model, method=method, transform=tensors.pop("_transform"))
            for layer, data in report.plot_data.items() for point, tensors in data.items()]


def preset_defaults(method: str) -> dict:
    """The flat settings --method implies before any flag (QuantConfig.flat() of its preset: the shared fields,
    each method's settings under its name). eval.table compares a run's config with these, so it needs no copy
    of the presets."""
    flat = methods.preset_config(method).flat() if method in methods.presets() else QuantConfig().flat()
    return {k: list(v) if isinstance(v, tuple) else v for k, v in flat.items() if k != "method"}


def method_info(quant: QuantConfig) -> dict:
    """The method, what the run used of it, the assumptions it rests on, its documentation page, and
    "defaults": the settings its preset implies (preset_defaults), which the results table compares the run's config with."""
    return {"name": quant.method, "transforms": list(quant.transforms), "activation_policy": quant.abits_policy,
            "weight_quantizer": quant.w_quantizer, "grid": quant.grid,
            "assumptions": methods.assumptions(quant), "doc": methods.doc_page(quant.method),
            "defaults": preset_defaults(quant.method)}
