"""Shard decoder layers over several devices.

``plan_layers`` is a pure function (sizes and budgets in, assignment out) so it can
be tested without GPUs; ``device_map`` turns an assignment into an accelerate device
map, and ``dispatch`` installs accelerate's hooks so inputs follow the layers.
"""
from __future__ import annotations

import torch
from torch import nn

from common.errors import UserError

GIB = 1024**3


def plan_layers(layer_bytes: list[int], budgets: list[int], resident_bytes: int = 0) -> list[int]:
    """Device index for each layer: contiguous runs, balanced in proportion to each device's room.

    Device 0 also holds the resident modules (embeddings, final norm, head): ``resident_bytes``.
    Raises UserError when the layers do not fit.
    """
    room = list(budgets)
    room[0] -= resident_bytes
    total = sum(layer_bytes)
    if room[0] < 0 or total > sum(max(r, 0) for r in room):
        raise UserError(f"the model needs {(total + resident_bytes) / GIB:.1f} GiB but the devices offer "
                        f"{sum(budgets) / GIB:.1f} GiB; add devices or calibrate out of core (--offload_dir)")
    share = [total * max(r, 0) / sum(max(r, 0) for r in room) for r in room]
    plan, device, used = [], 0, 0
    for size in layer_bytes:
        last = device == len(room) - 1
        if not last and (used + size > room[device] or used + size / 2 > share[device]):
            device, used = device + 1, 0  # next device once this one has its share
        if used + size > room[device]:
            raise UserError(f"layer of {size / GIB:.2f} GiB does not fit on device {device}; "
                            "calibrate out of core (--offload_dir)")
        plan.append(device)
        used += size
    return plan


def module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))


def device_map(model: nn.Module, layers_path: str, plan: list[int], devices: list[str]) -> dict[str, str]:
    """accelerate device map: every module outside the layers on devices[0], layer i on devices[plan[i]]."""
    mapping: dict[str, str] = {}
    parts = layers_path.split(".")
    for depth in range(len(parts)):  # siblings of each ancestor of the layer list
        parent = ".".join(parts[:depth])
        module = model.get_submodule(parent) if parent else model
        for name, _ in module.named_children():
            if name != parts[depth]:
                mapping[f"{parent}.{name}" if parent else name] = devices[0]
    for i, device in enumerate(plan):
        mapping[f"{layers_path}.{i}"] = devices[device]
    return mapping


def visible_cuda_budgets(fraction: float = 0.9, reserve_bytes: int = 0) -> tuple[list[str], list[int]]:
    """All visible GPUs (CUDA_VISIBLE_DEVICES is respected by torch) and their free memory."""
    count = torch.cuda.device_count()
    if count == 0:
        raise UserError("--multigpu needs visible CUDA devices; none found (check CUDA_VISIBLE_DEVICES)")
    devices = [f"cuda:{i}" for i in range(count)]
    budgets = [int(torch.cuda.mem_get_info(i)[0] * fraction) - reserve_bytes for i in range(count)]
    return devices, budgets


def describe(plan: list[int], devices: list[str], layer_bytes: list[int]) -> str:
    lines = []
    for d, name in enumerate(devices):
        idx = [i for i, p in enumerate(plan) if p == d]
        if idx:
            size = sum(layer_bytes[i] for i in idx) / GIB
            lines.append(f"{name}: layers {idx[0]}-{idx[-1]} ({len(idx)} layers, {size:.2f} GiB)"
                         + (" + embeddings/head" if d == 0 else ""))
    return "placement plan:\n  " + "\n  ".join(lines)


def dispatch(model: nn.Module, mapping: dict[str, str]) -> nn.Module:
    from accelerate import dispatch_model

    return dispatch_model(model, device_map=mapping)
