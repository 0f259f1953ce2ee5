"""GPTQ over the readers of one input (q/k/v) stacked into one sweep equals one sweep per reader bit for bit, so
out of core (where the stacked copy costs memory) the readers are swept one at a time with the same numbers;
and a run keeps the weights' integer codes only when a checkpoint or an export will read them."""
import torch
from torch import nn

from models.execution import run_block
from models.registry import adapter_for
from rptq import methods
from rptq.calibrate import calibrate_block
from rptq.context import BlockContext
from rptq.observe import make_observers
from rptq.weights import _gptq_readers
from tests.helpers import inject_opt_outliers, rptq_config, tiny_opt
from tests.test_llama import inject_outliers, tiny_llama


def _observed(model, cfg, ids):
    adapter = adapter_for(model.config)
    spec = adapter.block_spec(model.config)
    block = adapter.make_block(adapter.layers(model)[0], spec)
    observers = make_observers(spec, cfg, ids.shape[0], 0)
    block.taps = nn.ModuleDict({p: observers.get(p, nn.Identity()) for p in spec.points})
    hidden = torch.randn(ids.shape[0], ids.shape[1], spec.hidden_size, generator=torch.Generator().manual_seed(1))
    kwargs = {}
    if spec.heads.rope:
        kwargs["position_embeddings"] = model.model.rotary_emb(hidden, torch.arange(ids.shape[1]).unsqueeze(0))
    run_block(block, hidden, kwargs)
    return BlockContext(block, observers, cfg, 0)


def test_per_reader_gptq_sweeps_equal_the_stacked_sweep():
    for model in (inject_opt_outliers(tiny_opt(seed=0, hidden=64, layers=1, heads=4, ffn=128), seed=1),
                  inject_outliers(tiny_llama(bias=True))):
        cfg = rptq_config(wbits=4, abits=4, reorder="")
        ctx = _observed(model, cfg, torch.zeros(4, 32, dtype=torch.long))
        point = ctx.spec.norm_edges[0].point  # read by q, k and v
        columns = ctx.block.module(ctx.spec.readers(point)[0]).weight.shape[1]
        wspec = methods.weight_spec(cfg, columns, None)
        stacked = _gptq_readers(ctx, point, wspec)
        for name in ctx.spec.readers(point):
            alone = _gptq_readers(ctx, point, wspec, (name,))[name]
            assert all(torch.equal(a, b) for a, b in zip(alone, stacked[name])), name


def test_codes_are_kept_only_when_asked():
    model = inject_opt_outliers(tiny_opt(seed=0, hidden=64, layers=1, heads=4, ffn=128), seed=1)
    adapter = adapter_for(model.config)
    spec = adapter.block_spec(model.config)
    hidden = torch.randn(2, 16, spec.hidden_size, generator=torch.Generator().manual_seed(2))
    cfg = rptq_config(wbits=4, abits=4, clusters={"R1": 4, "R2": 2, "R3": 2, "R4": 4, "R5": 4})
    weights = {}
    for keep in (True, False):
        block = adapter.make_block(tiny_opt(seed=0, hidden=64, layers=1, heads=4, ffn=128).model.decoder.layers[0],
                                   spec)
        calibrate_block(block, hidden, {}, cfg, side_by_side=keep, keep_codes=keep)
        assert bool(block.weight_codes) == keep
        weights[keep] = {n: block.module(n).weight.detach().clone() for n in spec.linear_inputs}
    assert all(torch.equal(weights[True][n], weights[False][n]) for n in spec.linear_inputs)
