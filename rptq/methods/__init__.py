"""The methods of the family, as choices of transforms and quantizers on one mechanism.

A method is a preset by paper name (``PRESETS``) that expands to settings of QuantConfig:
the transform steps run in order on each block (``STEPS``: each re-expresses activation
points through rptq.fold and records its decisions), the activation policy (``POLICIES``:
point -> QuantSpec), and the weight quantizer. Individual flags override a preset, so
methods compose (``--transforms smooth,reorder``: SmoothQuant's scales before RPTQ's
clusters). No method names a model's modules: they read the block declaration.
"""
from __future__ import annotations

import importlib

from quant.quantizer import WeightSpec, fixed_groups

from ..config import FP, QuantConfig, point_reorder

# step name -> (module, function)
STEPS = {"reorder": ("rptq", "reorder_step"), "smooth": ("smoothquant", "smooth_step"), "lae": ("fptq", "lae_step"),
         "rotate": ("duquant", "rotate_step"), "qk_rotate": ("duquant", "qk_rotate_step"),
         # residual_rotate is model-level: rptq.pipeline rotates the whole model before layer 0 (wherever it is listed)
         "residual_rotate": ("quarot", "residual_step"), "head_rotate": ("quarot", "head_rotate_step"),
         "mlp_rotate": ("quarot", "mlp_rotate_step"),
         # spin_rotate is model-level too: R1 and each layer's R2 are learned before layer 0 (rptq.spin_learn)
         "spin_rotate": ("spinquant", "spin_step")}
# activation policy -> module with activation(ctx, point, role) and describe(cfg, spec, point, role)
POLICIES = {"rptq": "rptq", "uniform": "rptq", "smoothquant": "smoothquant", "fptq": "fptq", "duquant": "duquant",
            "quarot": "quarot", "spinquant": "spinquant"}

# Settings each preset implies; a flag given on the command line wins. Documented in the README.
PRESETS: dict[str, dict] = {
    "rptq": dict(transforms=("reorder",), abits_policy="rptq", grid="reference", w_quantizer="gptq",
                 w_range="minmax", w_group_size=0, w_clip=1.0),
    "smoothquant": dict(transforms=("smooth",), abits_policy="smoothquant", grid="symmetric", w_quantizer="rtn",
                        w_range="minmax", w_group_size=0, w_clip=1.0, wbits=8, abits=8,
                        smooth=dict(alpha=0.5, points="norm")),
    "fptq": dict(transforms=("lae",), abits_policy="fptq", grid="full", w_quantizer="rtn", w_range="minmax",
                 w_group_size=128, w_clip=1.0, wbits=4, abits=8),
    "duquant": dict(transforms=("smooth", "rotate", "qk_rotate"), abits_policy="duquant", grid="full",
                    w_quantizer="rtn", w_range="minmax", w_group_size=0, w_clip=0.8, wbits=4, abits=4,
                    smooth=dict(alpha=0.6, points="all", floor=1e-2), rotation=dict(kind="duquant")),
    "rotation": dict(transforms=("rotate", "qk_rotate"), abits_policy="duquant", grid="full", w_quantizer="rtn",
                     w_range="minmax", w_group_size=0, w_clip=0.8, wbits=4, abits=4,
                     rotation=dict(kind="hadamard")),
    "quarot": dict(transforms=("residual_rotate", "head_rotate", "qk_rotate", "mlp_rotate"), abits_policy="quarot",
                   grid="quarot", w_quantizer="gptq", w_range="minmax", w_group_size=0, w_clip=1.0,
                   w_clip_search=True, wbits=4, abits=4, rotation=dict(act_clip=0.9)),
    "spinquant": dict(transforms=("residual_rotate", "spin_rotate", "head_rotate", "qk_rotate", "mlp_rotate"),
                      abits_policy="spinquant", grid="quarot", w_quantizer="gptq", w_range="minmax",
                      w_group_size=0, w_clip=1.0, w_clip_search=True, wbits=4, abits=4,
                      rotation=dict(act_clip=1.0), residual=dict(kv_clip=1.0, across_heads=False)),
}
METHODS = tuple(PRESETS)


def _module(name: str):
    return importlib.import_module(f"{__name__}.{name}")


def step(name: str):
    module, function = STEPS[name]
    return getattr(_module(module), function)


def policy(cfg: QuantConfig):
    return _module(POLICIES[cfg.abits_policy])


def describe_activation(cfg: QuantConfig, spec, point: str, role: str) -> dict:
    return policy(cfg).describe(cfg, spec, point, role)


def weight_groups(cfg: QuantConfig, columns: int, point_groups: tuple[int, ...] | None) -> tuple[int, ...] | None:
    """Input-channel groups of a weight: fixed groups of --w_group_size, or the input point's
    clusters (RPTQ: one range per output row and input cluster), or one per row."""
    if cfg.w_group_size > 0:
        return fixed_groups(columns, cfg.w_group_size)
    return point_groups


def weight_spec(cfg: QuantConfig, columns: int, point_groups: tuple[int, ...] | None) -> WeightSpec:
    return WeightSpec(bits=cfg.weight_bits, group_sizes=weight_groups(cfg, columns, point_groups), grid=cfg.grid,
                      include_zero=cfg.w_range == "with_zero", clip=cfg.w_clip, fp16_scales=cfg.fp16_scales,
                      sf8_scales=cfg.sf8_scales, clip_search=cfg.w_clip_search)


def describe_weight(cfg: QuantConfig, spec, point: str) -> dict:
    bits = cfg.weight_bits
    if bits >= FP:
        gran = "none"
    elif cfg.w_group_size > 0:
        gran = f"row x group({cfg.w_group_size})"
    else:
        reorder = point_reorder(spec).get(point)
        gran = f"row x cluster({reorder})" if reorder and cfg.reorders(reorder) else "row"
    if bits < FP and cfg.w_quantizer == "gptqt":
        gran += " binary-coded"
    return {"bits": bits, "granularity": gran, "static": True}


def bit_manifest(cfg: QuantConfig, spec) -> dict[str, dict]:
    """Per tensor point: bits, granularity, static or dynamic (stored in results.json)."""
    manifest = {point: describe_activation(cfg, spec, point, role) for point, role in spec.points.items()}
    for linear, point in spec.linear_inputs.items():
        manifest[f"weight:{linear}"] = describe_weight(cfg, spec, point)
    return manifest


# What a step or policy assumes where its paper or code is silent (the method specs in shared/methods/);
# stored in results.json and listed in the README.
ASSUMPTIONS: dict[str, tuple[str, ...]] = {
    "lae": ("FPTQ: the strategy of each point is decided on the unmodified FP statistics, before LAE",
            "FPTQ: a point with v0 < r <= v1 that no norm feeds (out_proj/o_proj, fc2/down_proj) runs per-token "
            "dynamic"),
    "fptq": ("FPTQ: K and V quantized per token and head, dynamic, symmetric INT8 (--kv_bits); Q, softmax and "
             "the attention products stay FP",
             "FPTQ: activations symmetric INT8, static scales = calibration max|X| / 127 with no clipping search",
             "FPTQ: weights INT4 asymmetric min-max RTN in groups of 128 (--w_group_size)"),
    "rotate": ("DuQuant: the rotation search runs on a seeded sample of calibration token rows of the point "
               "(--rotation_block, 2048 rows) from the FP pass, not on the block's output for the mean input "
               "sequence as the official code does",),
    "residual_rotate": ("QuaRot R1: a randomized Hadamard D H (random signs on H's rows) of the hidden width where "
                        "one is built (m * 2^k, m from Paley I/II), else a random orthogonal matrix (QR of a "
                        "Gaussian, sign-fixed), seeded by --seed; which one is in results.json",
                        "QuaRot R1: the LM head is untied from the embeddings when they share a tensor (the final "
                        "norm's gain goes into the head only); OPT's LayerNorms become RMSNorms on a zero-mean "
                        "residual (SliceGPT), the final LayerNorm's shift a head bias"),
    "quarot": ("QuaRot: linear inputs on QuaRot's grid (quant.grid 'quarot'): scale clip * absmax / (2^(b-1) - 1), "
               "codes clamped to [-2^(b-1), 2^(b-1) - 1] as its sym_quant does; Q and the softmax output stay FP "
               "as in QuaRot's fake-quant code",
               "QuaRot: K and V per token x head (group = head_dim), asymmetric, clip 0.95, at --abits",
               "QuaRot: weights per output channel, symmetric, GPTQ (damp --percdamp, no act-order; RTN with "
               "--w_quantizer rtn) with QuaRot's clipping search (its --w_clip: per row the shrink p = 1 - i/100, "
               "i < 80, of least sum |w_hat - w|^2.4; quant.clip_search), on QuaRot's grid (scale absmax / (2^(b-1) - 1), codes "
               "-2^(b-1) .. 2^(b-1) - 1 as its WeightQuantizer's sym_quant: a clipped or GPTQ-updated weight may "
               "take the extra negative code)",
               "QuaRot: R2 and R4 are plain Hadamards (random orthogonal where none of the width is built), "
               "R2 the same on every head; the online mixer across heads at o_proj's input (QuaRot's partial "
               "Hadamard) is a Hadamard of order num_heads where one is built, else random orthogonal "
               "(SmolLM2-135M's 9 heads: random; QuaRot's code has no order-9 Hadamard)"),
    "spin_rotate": ("SpinQuant: R1 and one R2 per layer learned by Cayley SGD (quant/cayley.py: exact Cayley "
                    "factor by a linear solve, step min(lr, 1/||A||_1) as the released SGDG, no momentum, no random "
                    "QR re-orthonormalisation), cosine schedule from --spin_lr 1.5; one calibration window per step "
                    "cycling over --spin_samples (the paper: 100 steps of 8 x 2048-token WikiText-2 windows)",
                    "SpinQuant: R1 starts from residual_rotate's seeded randomized Hadamard, each R2 from a seeded "
                    "randomized Hadamard of head_dim (the released code's random_hadamard_matrix); the same R2 on "
                    "every head of a layer (GQA: each query head's o_proj columns use its K/V head's R2)",
                    "SpinQuant: during learning, with GPTQ weights afterwards (the default), the weights stay full "
                    "precision (the released README: rotations for GPTQ are learned on W16A4KV4); with --w_quantizer "
                    "rtn they are RTN per output channel on the run's grid without the clipping search (the released "
                    "code runs its search every step; too slow on a CPU); activations, K and V by the method's "
                    "policy, all with straight-through rounding; R3/R4 fixed Hadamards in the forward; the learning "
                    "computes in float32 (the released code in bf16)"),
    "spinquant": ("SpinQuant: linear inputs per token, asymmetric, dynamic, clip 1.0 (its scripts' --a_asym, "
                  "a_clip_ratio 1.0); on the full grid [min, max] of each token (the released code widens the range "
                  "to include 0)",
                  "SpinQuant: o_proj's input per token x head (its eval code sets the group size to head_dim there) "
                  "and no online Hadamard across heads (ResidualSettings.across_heads off), unlike QuaRot",
                  "SpinQuant: K and V per token x head, asymmetric, clip 1.0 (--k_asym --v_asym, groups of head_dim); "
                  "Q and the softmax output FP",
                  "SpinQuant: weights per output channel, symmetric, GPTQ with QuaRot's clipping search (its "
                  "--w_clip) after learning, on QuaRot's weight grid (codes -2^(b-1)..2^(b-1)-1), as QuaRot's "
                  "preset here"),
    "gptqt": ("GPTQT: intermediate bits n = k + 1; level sets on the n-bit integer grid; re-explore gammas "
              "0.50..1.50 scored by the Hessian-diagonal-weighted error; variant B (GPTQ compensates the final "
              "rounding)",),
}
