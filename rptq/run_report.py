"""What a run reports besides its numbers: the method it ran, where transforms went, plot data."""
from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from common.atomic import atomic_write
from common.errors import UserError

from .config import QuantConfig
from .methods import ASSUMPTIONS


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
    """Per plotted layer and transformed point: channel ranges before and after (eval.plots reads them)."""
    written = []
    for layer, data in report.plot_data.items():
        for point, tensors in data.items():
            rel = f"plots/data/layer{layer:03d}_{point}.safetensors"
            meta = {"model": Path(model).name, "layer": str(layer), "point": point, "method": method,
                    "transform": tensors.pop("_transform")}
            arrays = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
            atomic_write(root / rel, lambda tmp, arrays=arrays, meta=meta: save_file(arrays, tmp, metadata=meta))
            written.append(rel)
    return written


def method_info(quant: QuantConfig) -> dict:
    """The method and what its preset expanded to, with the assumptions it rests on."""
    return {"name": quant.method, "transforms": list(quant.transforms), "activation_policy": quant.abits_policy,
            "weight_quantizer": quant.w_quantizer, "grid": quant.grid,
            "assumptions": [text for step in (*quant.transforms, quant.abits_policy, quant.w_quantizer)
                            for text in ASSUMPTIONS.get(step, ())]}
