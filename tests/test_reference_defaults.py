"""The RPTQ reference's calibration semantics are the rptq preset's defaults, each one flag away from ours:
k-means' random_state 0 (--kmeans_seed), clusters in k-means' label order (--cluster_order), the softmax grid
already acting in the statistics pass (--calib_softmax), and the next block calibrated on this block's
calibration-pass outputs unless its weights were quantized (--block_inputs weights). Each is checked against a
plain reimplementation written here."""
from __future__ import annotations

import copy

import numpy as np
import torch
from sklearn.cluster import KMeans

from models.execution import capture_block_inputs, run_block, wrap_blocks
from models.registry import adapter_for
from quant.quantizer import unit_grid
from rptq.calibrate import calibrate_block
from rptq.cluster import cluster_channels
from rptq.methods import preset_config
from rptq.methods.rptq import RPTQSettings
from rptq.pipeline import quantize_model
from tests.helpers import inject_opt_outliers, tiny_opt

SMALL = {"R1_clusters": 4, "R2_clusters": 2, "R3_clusters": 2, "R4_clusters": 4, "R5_clusters": 4}


def test_label_order_is_the_references_argsort_of_kmeans_labels():
    feats = torch.randn(96, 2, generator=torch.Generator().manual_seed(1)) * torch.tensor([3.0, 1.0])
    # the reference: k-means on the float32 features, then torch.argsort of its labels, whose default sort is
    # not stable (inside a cluster the channels are not in index order; GPTQ's column order depends on it)
    labels = KMeans(n_clusters=6, n_init=10, random_state=0).fit(feats.numpy()).labels_
    reference = torch.argsort(torch.from_numpy(labels))
    ours = cluster_channels(feats, 6, seed=0, order="label")
    assert ours.perm.tolist() == reference.tolist()
    assert ours.perm.tolist() != np.argsort(labels, kind="stable").tolist()  # the stable order differs here
    assert list(ours.sizes) == np.bincount(labels).tolist()
    by_feature = cluster_channels(feats, 6, seed=0, order="feature")
    groups = lambda lay: sorted(tuple(sorted(g.tolist())) for g in torch.split(lay.perm, list(lay.sizes)))  # noqa
    assert groups(by_feature) == groups(ours)  # the same partition, the clusters in another order


def _rptq_cfg(seed: int, **settings):
    cfg = preset_config("rptq", wbits=4, abits=4, seed=seed)
    return cfg.using(RPTQSettings(**{**SMALL, **settings}))


def test_kmeans_follows_its_own_seed_not_the_run_seed():
    model = inject_opt_outliers(tiny_opt(seed=0))
    ids = torch.randint(4, 1000, (4, 32), generator=torch.Generator().manual_seed(0))

    def layouts(cfg):
        m = copy.deepcopy(model)
        return [r.layouts for r in quantize_model(m, adapter_for(m.config), ids, cfg, progress=False).layers]

    assert layouts(_rptq_cfg(2)) == layouts(_rptq_cfg(3))  # same windows: same clusters whatever --seed
    assert layouts(_rptq_cfg(2)) == layouts(_rptq_cfg(7, kmeans_seed=0))
    assert any(a != b for a, b in zip(layouts(_rptq_cfg(2, kmeans_seed=2)), layouts(_rptq_cfg(2, kmeans_seed=5))))


def _block_and_inputs():
    model = inject_opt_outliers(tiny_opt(seed=0, layers=1))
    adapter = adapter_for(model.config)
    ids = torch.randint(4, 1000, (4, 32), generator=torch.Generator().manual_seed(0))
    inputs, kwargs = capture_block_inputs(model, adapter.layers(model), ids, torch.device("cpu"))
    wrap_blocks(model, adapter)
    return adapter.layers(model)[0], inputs, kwargs


def _plain_forward(block, inputs, kwargs, round_probs: bool):
    """The block in full precision, its softmax output on the 1/255 grid or not (a fresh copy, own taps)."""
    block = copy.deepcopy(block)
    block.taps = torch.nn.ModuleDict({p: _Round() if round_probs and p == "p" else torch.nn.Identity()
                                      for p in block.spec.points})
    return run_block(block, inputs, kwargs)


class _Round(torch.nn.Module):
    def forward(self, x):
        return unit_grid(x)


def _next_inputs(block, inputs, kwargs, wbits, **settings):
    cfg = preset_config("rptq", wbits=wbits, abits=4, **({"block_inputs": settings.pop("block_inputs")}
                                                         if "block_inputs" in settings else {}))
    cfg = cfg.using(RPTQSettings(**{**SMALL, **settings}))
    out, _ = calibrate_block(copy.deepcopy(block), inputs, kwargs, cfg)
    return out


def test_unquantized_weights_pass_the_calibration_pass_outputs_on_with_the_softmax_on_its_grid():
    block, inputs, kwargs = _block_and_inputs()
    rounded, plain = _plain_forward(block, inputs, kwargs, True), _plain_forward(block, inputs, kwargs, False)
    assert (rounded - plain).abs().max() > 0  # the grid makes a difference here
    # the default (the reference): W16 passes on the statistics pass's outputs, the softmax rounded in it
    assert torch.equal(_next_inputs(block, inputs, kwargs, 16), rounded)
    assert torch.equal(_next_inputs(block, inputs, kwargs, 16, calib_softmax="fp"), plain)
    quantized = _next_inputs(block, inputs, kwargs, 16, block_inputs="quantized")
    assert (quantized - rounded).abs().max() > 1e-3  # this block's A4 outputs instead
    # weights quantized: the quantized block's outputs, as the reference recomputes them after GPTQ
    assert torch.equal(_next_inputs(block, inputs, kwargs, 4),
                       _next_inputs(block, inputs, kwargs, 4, block_inputs="quantized"))
    assert (_next_inputs(block, inputs, kwargs, 4) - rounded).abs().max() > 1e-3
