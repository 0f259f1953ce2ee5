"""``--export compressed-tensors DIR``: the quantized model as a Hugging Face model directory in the
compressed-tensors format (config.json with its ``quantization_config``, safetensors, tokenizer),
written by the compressed-tensors library itself, which transformers and vLLM load.

rptq.export_plan puts every tensor in the model's own basis and each quantized linear's integers on
the format's grid; here a plain Hugging Face model (fp32: our dequantization arithmetic) receives
those tensors, compressed-tensors attaches its schemes and parameters (our scales and zero points,
never re-derived) and compresses; every linear is then decompressed by the library and compared
with our weight bit for bit before the directory appears (built beside DIR, renamed into place).
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from common.errors import UserError

from .export_plan import ExportPlan, plan_export

NOTE_DYNAMIC = ("per-token dynamic ranges are recomputed by the runtime on its own grid (symmetric: max|x| / 127.5 "
                "on codes -128..127; ours max|x| / 127 on -127..127), so activations agree to within a "
                "quantization step, not bit for bit")
NOTE_ASYM_PACKED = ("transformers 5.23 loads asymmetric pack-quantized weights only with from_pretrained(DIR, "
                    "quantization_config=CompressedTensorsConfig(dequantize=True)): when it prepares the model, "
                    "compressed-tensors 0.19 gives the zero point its unpacked shape (llm-compressor#1618); "
                    "the file holds the packed zero points that vLLM reads")


def _is_previous_export(path: Path) -> bool:
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return (config.get("quantization_config") or {}).get("quant_method") == "compressed-tensors"


def check_export_dir(path: str) -> None:
    """Before any model is loaded: DIR is new, empty, or an earlier export (replaced whole)."""
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise UserError(f"--export {root} is a file; pass a directory")
    if root.is_dir() and any(root.iterdir()) and not _is_previous_export(root):
        raise UserError(f"--export {root} exists and is not a compressed-tensors export; choose a new directory")


def _schemes(plan: ExportPlan) -> dict:
    """One config group per distinct (weight, input) quantization, targeting its linears by name."""
    # Lazy on purpose: compressed-tensors imports transformers (~1.1 s, python -X importtime on the 2-core dev
    # machine); only an --export run needs it.
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    groups: dict[str, list] = {}
    for linear in plan.linears:
        key = json.dumps([linear.weight_args, linear.input_args], sort_keys=True)
        groups.setdefault(key, []).append(linear.name)
    schemes = {}
    for i, (key, names) in enumerate(groups.items()):
        weights, inputs = json.loads(key)
        schemes[f"group_{i}"] = QuantizationScheme(
            targets=names, weights=QuantizationArgs(**weights),
            input_activations=QuantizationArgs(**inputs) if inputs else None)
    return schemes


def _build(plan: ExportPlan, config):
    """A plain Hugging Face model holding the plan's tensors, with the compressed-tensors schemes attached
    and our scales / zero points in the parameters the library created."""
    # Lazy on purpose: transformers and compressed-tensors take seconds to import (python -X importtime on the
    # 2-core dev machine); only an --export run needs them.
    from accelerate import init_empty_weights
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = hf.load_state_dict(plan.state, strict=False, assign=True)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if unexpected or set(missing) - tied:
        raise UserError(f"the model's tensors do not match a fresh {config.model_type} model "
                        f"({(unexpected or sorted(set(missing) - tied))[0]}); re-run the quantization")
    if tied:
        hf.tie_weights()
    apply_quantization_config(hf, QuantizationConfig(config_groups=_schemes(plan)), show_progress=False)
    with torch.no_grad():
        for linear in plan.linears:
            module = hf.get_submodule(linear.name)
            module.weight_scale.data = linear.scale.to(module.weight_scale.dtype)
            if linear.zero is not None:
                module.weight_zero_point.data = linear.zero.to(module.weight_zero_point.dtype)
            if linear.input_scale is not None:
                module.input_scale.data = linear.input_scale.to(module.input_scale.dtype).clone()  # q/k/v share one
                if linear.input_zero is not None:
                    module.input_zero_point.data = linear.input_zero.to(module.input_zero_point.dtype).clone()
    return hf.eval()


def _verify(hf, plan: ExportPlan) -> None:
    """Every compressed linear, decompressed by the library, is our weight bit for bit."""
    # Lazy on purpose: see _build (compressed-tensors' import cost).
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.utils import get_direct_state_dict

    for linear in plan.linears:
        module = hf.get_submodule(linear.name)
        scheme = module.quantization_scheme
        compressor = BaseCompressor.get_value_from_registry(scheme.format.value)
        state = compressor.decompress(dict(get_direct_state_dict(module)), scheme)
        if not torch.equal(state["weight"].float(), linear.weight):
            diff = float((state["weight"].float() - linear.weight).abs().max())
            raise UserError(f"{linear.name} does not decompress to the quantized weight (max difference "
                            f"{diff:.3g}); the format's grid cannot hold it exactly: use --w_range with_zero "
                            "--grid full")


def _replace_dir(tmp: Path, dest: Path) -> None:
    """``tmp`` becomes ``dest``; an earlier export there is removed only once the new one is complete."""
    old = None
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
    os.replace(tmp, dest)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _weight_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.glob("*.safetensors"))


def export_compressed_tensors(out_dir: str, model, adapter, tokenizer) -> dict:
    """Write ``out_dir``; returns what results.json records under ``export``. Refuses (UserError, one line,
    nothing written) whatever the format cannot hold exactly."""
    try:
        return _export(out_dir, model, adapter, tokenizer)
    except UserError as exc:
        raise UserError(f"--export compressed-tensors: {exc}") from None


def _export(out_dir: str, model, adapter, tokenizer) -> dict:
    plan = plan_export(model, adapter)
    # Lazy on purpose: see _build (compressed-tensors' import cost).
    from compressed_tensors.compressors import ModelCompressor

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):  # GGUF loads carry one; ours replaces it
        del config.quantization_config
    config.dtype = torch.float32
    fp16_bytes = 2 * sum(p.numel() for p in model.parameters())  # the same model in fp16 (tied tensors once)
    hf = _build(plan, config)
    compressor = ModelCompressor.from_pretrained_model(hf)
    compressor.compress_model(hf)
    _verify(hf, plan)
    dest = Path(out_dir)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        compressor.remove_decompression_hook(hf)  # saving must not trigger it
        hf.save_pretrained(str(tmp))
        compressor.update_config(str(tmp))
        tokenizer.save_pretrained(str(tmp))
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700 (and the writers' temporary files 0600): meant to be shared
        for path in tmp.iterdir():
            os.chmod(path, 0o644)
        _replace_dir(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _record(dest, plan, compressor.quantization_config, fp16_bytes)


def _record(dest: Path, plan: ExportPlan, qconfig, fp16_bytes: int) -> dict:
    """results.json's ``export``: where, which format and schemes, what the format left out, the size."""
    fmt = getattr(qconfig.format, "value", qconfig.format)
    notes = [NOTE_DYNAMIC] if any(p.input_args and p.input_args["dynamic"] for p in plan.linears) else []
    if any(not p.weight_args["symmetric"] for p in plan.linears) and "pack" in fmt:
        notes.append(NOTE_ASYM_PACKED)
    if plan.dropped:
        notes.append("not in the format, so the export runs them in floating point: the quantizers at "
                     + ", ".join(f"{p} ({what})" for p, what in plan.dropped.items())
                     + " (inside attention; the format quantizes linear weights and inputs)")
    size = _weight_bytes(dest)

    def args(a):
        return a.model_dump(include=_ARGS) if a is not None else None

    return {"format": "compressed-tensors", "dir": str(dest), "compression_format": fmt,
            "linears": len(plan.linears),
            "schemes": {name: {"targets": len(s.targets), "weights": args(s.weights),
                               "input_activations": args(s.input_activations)}
                        for name, s in qconfig.config_groups.items()},
            "not_in_format": dict(plan.dropped), "notes": notes, "weight_file_bytes": size,
            "fp16_bytes": fp16_bytes, "ratio": round(size / fp16_bytes, 4)}


_ARGS = {"num_bits", "symmetric", "strategy", "group_size", "dynamic"}


def describe_export(info: dict) -> list[str]:
    """The lines a run prints after exporting."""
    mib = 2**20
    lines = [f"export {info['dir']}: compressed-tensors {info['compression_format']}, {info['linears']} quantized "
             f"linears; {info['weight_file_bytes'] / mib:.2f} MiB of safetensors vs "
             f"{info['fp16_bytes'] / mib:.2f} MiB in fp16 ({info['ratio']:.4f}x)"]
    return lines + [f"export note: {note}" for note in info["notes"]]
