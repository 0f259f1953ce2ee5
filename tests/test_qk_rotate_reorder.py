"""DuQuant's rotations followed by RPTQ's reorder (--transforms smooth,rotate,qk_rotate,reorder): after
qk_rotate mixes Q/K channels, the reorder step clusters them from the token sample the observers keep."""
import copy

import torch

from models.registry import adapter_for
from rptq.config import QuantConfig
from rptq.methods.duquant import RotationSettings
from rptq.methods.smoothquant import SmoothSettings
from rptq.pipeline import quantize_model
from tests.helpers import inject_opt_outliers, tiny_opt


def test_reorder_after_qk_rotate_is_exact_at_full_precision_and_clusters_q():
    model = inject_opt_outliers(tiny_opt(seed=0, hidden=64, layers=2, heads=4, ffn=128), seed=1)
    ids = torch.randint(4, 1000, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(ids).logits
    cfg = QuantConfig(method="duquant", transforms=("smooth", "rotate", "qk_rotate", "reorder"),
                      abits_policy="uniform", grid="full", w_quantizer="rtn", wbits=16, abits=16).using(
        SmoothSettings(alpha=0.6, points="all", floor=1e-2), RotationSettings(kind="duquant", steps=8))
    quant = copy.deepcopy(model)
    adapter = adapter_for(quant.config)
    report = quantize_model(quant, adapter, ids, cfg, progress=False)
    with torch.no_grad():
        got = quant(ids).logits
    assert (got - want).abs().max().item() < 1e-4  # every transform is exact without quantization
    spec = adapter.block_spec(quant.config)
    for layer in report.decisions():
        assert layer["groups"][spec.qk_edge.q_point] == 4 * 4  # R2 = 4 clusters in each of the 4 heads
        assert layer["groups"][spec.qk_edge.k_point] == 4 * 4
