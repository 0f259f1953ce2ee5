"""The layer placement planner (no GPU needed) and a sharded run over a CPU device map."""
import copy

import pytest
import torch

from models.placement import GIB, device_map, dispatch, plan_layers
from models.registry import adapter_for
from common.errors import UserError
from rptq.pipeline import quantize_model
from tests.helpers import inject_opt_outliers, rptq_config, tiny_opt


def test_balanced_contiguous_plan():
    assert plan_layers([1] * 8, [100, 100]) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert plan_layers([1] * 6, [100, 100, 100]) == [0, 0, 1, 1, 2, 2]
    plan = plan_layers([1] * 8, [100, 100], resident_bytes=40)  # device 0 also holds embeddings/head
    assert plan.count(0) < plan.count(1) and plan == sorted(plan)


def test_plan_respects_budgets_and_one_device():
    assert plan_layers([10] * 4, [25, 100]) == [0, 1, 1, 1]  # shares follow free memory: 20% of 40
    assert plan_layers([10] * 4, [100, 25]) == [0, 0, 0, 1]
    assert plan_layers([10] * 5, [1000]) == [0] * 5


def test_plan_refuses_what_does_not_fit():
    with pytest.raises(UserError, match="--offload_dir"):
        plan_layers([10 * GIB] * 10, [40 * GIB, 40 * GIB])
    with pytest.raises(UserError, match="does not fit"):
        plan_layers([30, 30, 30], [40, 40, 40], resident_bytes=20)


def test_device_map_covers_every_module_once():
    model = tiny_opt(layers=3)
    mapping = device_map(model, "model.decoder.layers", [0, 1, 1], ["cuda:0", "cuda:1"])
    assert mapping["model.decoder.layers.0"] == "cuda:0" and mapping["model.decoder.layers.2"] == "cuda:1"
    assert mapping["model.decoder.embed_tokens"] == "cuda:0" and mapping["lm_head"] == "cuda:0"
    covered = [n for n, _ in model.named_parameters() if any(n == k or n.startswith(k + ".") for k in mapping)]
    assert len(covered) == len(list(model.named_parameters()))


def test_sharded_run_over_cpu_map_equals_unsharded():
    model = inject_opt_outliers(tiny_opt(layers=3), seed=1)
    windows = torch.randint(4, 50000, (4, 32), generator=torch.Generator().manual_seed(0))
    cfg = rptq_config(wbits=4, abits=4, clusters={"R1": 4, "R2": 2, "R3": 2, "R4": 4, "R5": 4})
    plain, sharded = copy.deepcopy(model), copy.deepcopy(model)
    adapter = adapter_for(model.config)
    quantize_model(plain, adapter, windows, cfg, progress=False)
    plan = plan_layers([1, 1, 1], [10, 10])
    devices = ["cpu", "cpu"]
    quantize_model(sharded, adapter, windows, cfg, progress=False, placement=[devices[p] for p in plan])
    sharded = dispatch(sharded, device_map(sharded, adapter.layers_path, plan, devices))
    with torch.no_grad():
        assert torch.equal(plain(windows).logits, sharded(windows).logits)
