"""One calibrated W4A4 RPTQ OPT decoder layer against a NumPy reimplementation of its forward.

A tiny OPT (outliers injected) is calibrated by the pipeline (RPTQ: R1..R5 reorder, GPTQ weights,
static per-cluster activation ranges on the reference grid, softmax on the fixed 1/255 grid).
Then layer 0's quantized block is recomputed here in NumPy float64, from what the block stores:

- the LayerNorms' input gathers (R1/R4 permutations) and their folded affine parameters;
- each linear's weight rebuilt from its stored per-(row, cluster) scale/zero and the integer codes
  (the codes are read off the stored weight, and checked to be integers on the grid's code range;
  one-column groups of one-channel clusters keep their weight, see weight_from_codes);
- each activation tap's stored per-channel scale/zero (its cluster layout), quantized with the
  grid's formula written here: (clamp(round(x / scale) + zero, qmin, qmax) - zero) * scale;
- the softmax probabilities on round(255 p) / 255 where that tap is on.

The forward is OPT's pre-LN layer: LN -> taps -> q (times head_dim^-0.5), k, v -> causal softmax
attention -> out_proj -> residual -> LN -> fc1 -> ReLU -> fc2 -> residual. Compared on a random
input to 1e-4 relative to what the block adds to its input (max |diff| / max |output - input|;
measured 1.6e-6). The code runs in float32, the reference in float64; with this seed no activation
lies within rounding noise of a rounding boundary (one flipped 4-bit code would show as ~1e-2).
Negative controls: leaving any one activation quantizer out of the NumPy block moves it by more
than 1e-3, so each one was reproduced, not merely tolerated.
"""
import copy

import numpy as np
import pytest
import torch

from models.registry import adapter_for
from rptq.pipeline import quantize_model
from tests.helpers import inject_opt_outliers, rptq_config, tiny_opt
from tests.test_reference_groups import code_limits  # the grids written out plainly, once

HIDDEN, HEADS, FFN = 32, 2, 64
HEAD_DIM = HIDDEN // HEADS
CLUSTERS = {"R1": 4, "R2": 2, "R3": 2, "R4": 4, "R5": 4}


def fake_quantize(x, scale, zero, bits, grid):
    qmin, qmax = code_limits(bits, grid)
    return (np.clip(np.round(x / scale) + zero, qmin, qmax) - zero) * scale


def layer_norm(x, weight, bias, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * weight + bias


def softmax(scores):
    e = np.exp(scores - scores.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def as_np(t):
    return t.detach().double().cpu().numpy()


def weight_from_codes(linear, codes_entry):
    """(codes - zero) * scale per (row, input cluster), after checking the stored weight is on that grid.

    A one-channel cluster (the outlier channels here) gives one-column weight groups: min == max in
    every row, so the scale sits at its 1e-8 floor and the zero point near -w * 1e8, far outside the
    code range. Such a group reproduces its weight (to float32 precision: a float32 weight cannot
    resolve steps of 1e-8, so no integer code can be read off it); those columns are taken as stored.
    """
    W = as_np(linear.weight)
    sizes = codes_entry["group_sizes"] or (W.shape[1],)
    group_scale = as_np(codes_entry["scale"])
    scale = np.repeat(group_scale, sizes, axis=1)
    zero = np.repeat(as_np(codes_entry["zero"]), sizes, axis=1)
    floored = scale <= np.float32(1e-8)  # exactly the floor (quant.quantizer clamps scales at 1e-8)
    one_column = np.repeat(np.array(sizes) == 1, sizes)
    assert np.all(one_column[np.nonzero(floored)[1]]), "only one-column groups may have a floored scale"
    real_codes = np.where(floored, 0.0, W / scale + zero)
    codes = np.round(real_codes)
    qmin, qmax = code_limits(codes_entry["bits"], codes_entry["grid"])
    assert np.abs(real_codes - codes).max() < 1e-3, "a stored weight is not on its (row, cluster) grid"
    assert codes[~floored].min() >= qmin and codes[~floored].max() <= qmax
    return np.where(floored, W, (codes - zero) * scale)


def read_block(block):
    """Everything the NumPy forward needs, as float64 arrays and plain values."""
    layer = block.layer
    for point, online in block.online.items():
        assert len(online) == 0, f"{point}: RPTQ on OPT should fold every transform"
    names = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.out_proj",
             "fc1": "fc1", "fc2": "fc2"}
    p = {}
    for short, name in names.items():
        linear = layer.get_submodule(name)
        p["W" + short] = weight_from_codes(linear, block.weight_codes[name])
        p["b" + short] = as_np(linear.bias)
    for short, norm in (("ln1", layer.self_attn_layer_norm), ("ln2", layer.final_layer_norm)):
        p[short] = (as_np(norm.weight), as_np(norm.bias), norm.eps)
    p["perm1"] = block.gathers["qkv_in"].numpy()
    p["perm4"] = block.gathers["fc1_in"].numpy()
    taps = {}
    for point, tap in block.taps.items():
        spec = tap.spec
        assert spec.dynamic is None  # static ranges: what the stored scale/zero hold
        if not spec.enabled:
            taps[point] = None
        elif spec.unit_grid:
            taps[point] = "unit"
        else:
            scale, zero = as_np(tap.scale), as_np(tap.zero)
            sizes = spec.group_sizes or (scale.size,)
            if scale.size > 1:  # one scale and zero per cluster: constant within each
                for part_s, part_z in zip(np.split(scale, np.cumsum(sizes)[:-1]), np.split(zero, np.cumsum(sizes)[:-1])):
                    assert np.all(part_s == part_s[0]) and np.all(part_z == part_z[0])
            taps[point] = (scale, zero, spec.bits, spec.grid)
    p["taps"] = taps
    return p


def quantize_at(p, point, x, skip):
    tap = p["taps"][point]
    if tap is None or point in skip:
        return x
    if tap == "unit":
        return np.round(x * 255) / 255
    scale, zero, bits, grid = tap
    return fake_quantize(x, scale, zero, bits, grid)


def numpy_opt_block(p, x, skip=()):
    """OPT's pre-LN decoder layer, written out; x: (batch, tokens, hidden). ``skip``: taps left unquantized."""
    batch, tokens, _ = x.shape
    residual = x
    h = layer_norm(x[..., p["perm1"]], *p["ln1"])  # LN statistics do not depend on the channel order
    h = quantize_at(p, "qkv_in", h, skip)
    q = quantize_at(p, "q", (h @ p["Wq"].T + p["bq"]) * HEAD_DIM**-0.5, skip)
    k = quantize_at(p, "k", h @ p["Wk"].T + p["bk"], skip)
    v = quantize_at(p, "v", h @ p["Wv"].T + p["bv"], skip)

    def heads(t):  # (batch, tokens, heads * head_dim) -> (batch, heads, tokens, head_dim)
        return t.reshape(batch, tokens, HEADS, HEAD_DIM).transpose(0, 2, 1, 3)

    scores = heads(q) @ heads(k).transpose(0, 1, 3, 2)
    future = np.triu(np.ones((tokens, tokens), dtype=bool), k=1)
    scores = np.where(future, -np.inf, scores)
    probs = quantize_at(p, "p", softmax(scores), skip)
    o = (probs @ heads(v)).transpose(0, 2, 1, 3).reshape(batch, tokens, HIDDEN)
    o = quantize_at(p, "out_in", o, skip)
    x = residual + o @ p["Wo"].T + p["bo"]

    residual = x
    h = layer_norm(x[..., p["perm4"]], *p["ln2"])
    h = quantize_at(p, "fc1_in", h, skip)
    h = np.maximum(h @ p["Wfc1"].T + p["bfc1"], 0.0)
    h = quantize_at(p, "fc2_in", h, skip)
    return residual + h @ p["Wfc2"].T + p["bfc2"]


@pytest.fixture(scope="module")
def calibrated_block():
    model = inject_opt_outliers(tiny_opt(seed=0, hidden=HIDDEN, layers=1, heads=HEADS, ffn=FFN, vocab=1000), seed=1)
    ids = torch.randint(4, 1000, (4, 16), generator=torch.Generator().manual_seed(3))
    quant = copy.deepcopy(model)
    cfg = rptq_config(clusters=dict(CLUSTERS), wbits=4, abits=4)  # the rptq preset's defaults
    quantize_model(quant, adapter_for(quant.config), ids, cfg, progress=False)
    return quant.model.decoder.layers[0]


def test_block_layout_is_what_the_reference_reads(calibrated_block):
    p = read_block(calibrated_block)
    assert sorted(p["perm1"].tolist()) == list(range(HIDDEN)) and sorted(p["perm4"].tolist()) == list(range(HIDDEN))
    assert not np.array_equal(p["perm1"], np.arange(HIDDEN))  # a real R1 permutation
    bits = {point: (tap if tap in (None, "unit") else tap[2]) for point, tap in p["taps"].items()}
    assert bits == {"qkv_in": 8, "q": 4, "k": 4, "v": 4, "p": "unit", "out_in": 4, "fc1_in": 8, "fc2_in": 4}
    assert len(calibrated_block.taps["qkv_in"].spec.group_sizes) == 4  # R1 clusters
    assert len(calibrated_block.taps["q"].spec.group_sizes) == HEADS * 2  # R2: per head


def test_w4a4_block_forward_equals_numpy(calibrated_block):
    p = read_block(calibrated_block)
    x = torch.randn(2, 8, HIDDEN, generator=torch.Generator().manual_seed(11)) * 0.5
    with torch.no_grad():
        got = calibrated_block(x).double().numpy()
    x = x.double().numpy()
    expected = numpy_opt_block(p, x)
    # relative to what the block adds to its input (the residual stream alone would hide errors)
    update = np.abs(expected - x).max()
    assert np.abs(got - expected).max() / update < 1e-4  # measured: 1.6e-6

    # negative controls: leaving out any one activation quantizer in the NumPy block (or all of
    # them) moves the output far beyond the tolerance, so each was reproduced, not just tolerated --
    # or, where the output cannot see a tap (q under a near one-hot softmax that P's 1/255 grid rounds
    # to exactly one-hot), the tap's own output must be the NumPy quantizer's on what it received
    enabled = [point for point, tap in p["taps"].items() if tap is not None]
    assert len(enabled) == 8
    unseen = [point for point in enabled if np.abs(got - numpy_opt_block(p, x, skip={point})).max() / update <= 1e-3]
    assert set(unseen) <= {"q", "k"}, unseen
    for point in unseen:
        seen = {}
        hook = calibrated_block.taps[point].register_forward_hook(
            lambda m, i, o: seen.update(x=i[0].double().numpy(), y=o.double().numpy()))
        with torch.no_grad():
            calibrated_block(torch.from_numpy(x).float())
        hook.remove()
        expected_tap = quantize_at(p, point, seen["x"], ())
        assert np.abs(seen["y"] - expected_tap).max() < 1e-5 and np.abs(expected_tap - seen["x"]).max() > 1e-2, point
    assert np.abs(got - numpy_opt_block(p, x, skip=set(enabled))).max() / update > 0.1
