"""GPTQT (Guo et al., 2024, arXiv 2407.02891) and plain binary coding as weight quantizers: 3- and 2-bit
weights stored as offset + sum of alpha_i b_i. The algorithms are quant.gptqt and quant.bcq; rptq.weights
runs them. This module declares their settings, flags and assumptions."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from common.errors import UserError

from ..config import QuantConfig
from ..method_api import Method, Needs, setting

GPTQT = Needs(w_quantizers=("gptqt",))
# GPTQT enumerates every level set on the inter_bits grid (quant/level_sets.py), ~16x more per bit: for 3-bit
# codes 441 at 4 bits, 116281 at 6 (measured: 14 s, 2 GB peak on the 2-core dev box), 1.9 million at 7 (~30 GB;
# `--inter_bits 12` was OOM-killed at 23 GB). 6 is the largest that runs on a workstation.
MAX_INTER_BITS = 6


@dataclass(frozen=True)
class GPTQTSettings:
    namespace: ClassVar[str] = "gptqt"
    inter_bits: int = setting(0, "inter_bits", f"GPTQT's step-1 bits, wbits + 1 .. {MAX_INTER_BITS} (default: wbits "
                              "+ 1)", type=int, needs=GPTQT)
    variant: str = setting("B", "gptqt_variant", "GPTQT: B = GPTQ compensates the binary-coded rounding; A = convert "
                           "GPTQ's final codes", choices=("A", "B"), needs=GPTQT)
    gammas: tuple[float, ...] = tuple(round(0.5 + 0.05 * i, 2) for i in range(21))


def check(settings: GPTQTSettings, cfg: QuantConfig, run) -> None:
    if cfg.w_quantizer in ("gptqt", "bcq") and cfg.wbits not in (2, 3):
        raise UserError(f"--w_quantizer {cfg.w_quantizer} makes 3- or 2-bit binary codes; use --wbits 3 or 2 "
                        f"(got {cfg.wbits})")
    if settings.inter_bits and not cfg.wbits < settings.inter_bits <= MAX_INTER_BITS:
        raise UserError(f"--inter_bits must be in wbits + 1 .. {MAX_INTER_BITS} = {cfg.wbits + 1} .. "
                        f"{MAX_INTER_BITS} (got {settings.inter_bits}): GPTQT enumerates every level set on the "
                        "inter_bits grid: 116281 (2 GB) at 6 bits, 1.9 million (~30 GB) at 7")


METHOD = Method(
    name="gptqt", summary="GPTQT (Guo et al., 2024, arXiv 2407.02891): GPTQ at wbits + 1, then each row's best "
    "binary-coded level set (--w_quantizer gptqt); --w_quantizer bcq: plain binary coding",
    settings=GPTQTSettings, check=check, w_quantizers=("gptqt", "bcq"),
    assumptions={"gptqt": ("GPTQT: intermediate bits n = k + 1; level sets on the n-bit integer grid; re-explore "
                           "gammas 0.50..1.50 scored by the Hessian-diagonal-weighted error; variant B (GPTQ "
                           "compensates the final rounding)",)},
)
