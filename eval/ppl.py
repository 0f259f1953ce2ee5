"""Perplexity over non-overlapping windows (GPTQ/RPTQ protocol).

ppl = exp(sum of next-token NLL / number of predicted tokens). Each window of
``seqlen`` tokens predicts its last ``seqlen - 1`` tokens. GPTQ's script (reused by
RPTQ) computes exp(sum_w loss_w * seqlen / (nwindows * seqlen)), where loss_w is
window w's mean NLL over its ``seqlen - 1`` predictions: that is the mean over windows
of each window's mean NLL, the same number as ours because every window has the same
length. (With ``--limit`` the RPTQ reference divided by the full window count; here
the count is that of the windows evaluated.)
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm import tqdm

from models.execution import capture_block_inputs, run_block
from models.streaming import return_freed_memory


@torch.no_grad()
def window_nll(model, window: torch.Tensor, device) -> tuple[float, int]:
    """Summed NLL of tokens 1..T-1 of one window given their prefixes, and the token count."""
    ids = window.unsqueeze(0).to(device)
    logits = model(ids, use_cache=False).logits[0, :-1].float()
    nll = F.cross_entropy(logits, ids[0, 1:], reduction="sum")
    return float(nll), ids.shape[1] - 1


def perplexity(model, windows: torch.Tensor, device="cpu", limit: int | None = None,
               progress: bool = True, desc: str = "ppl") -> float:
    if limit is not None and limit > 0:
        windows = windows[:limit]
    total_nll, total_tokens = 0.0, 0
    for window in tqdm(windows, desc=desc, disable=not progress):
        nll, tokens = window_nll(model, window, device)
        total_nll += nll
        total_tokens += tokens
    return math.exp(total_nll / total_tokens)


@torch.no_grad()
def streamed_perplexity(model, adapter, windows: torch.Tensor, block_at, device="cpu", limit: int | None = None,
                        progress: bool = True, desc: str = "ppl") -> float:
    """Perplexity with one decoder block resident at a time (out-of-core models).

    ``block_at(i)`` returns block i ready to run; it is released after all windows have
    passed through it. Same numbers as :func:`perplexity` on the in-memory model.
    """
    if limit is not None and limit > 0:
        windows = windows[:limit]
    layers = adapter.layers(model)
    hidden, layer_kwargs = capture_block_inputs(model, layers, windows, device)
    for i in tqdm(range(len(layers)), desc=f"{desc} (layer by layer)", disable=not progress):
        block = block_at(i)
        hidden = run_block(block, hidden, adapter.layer_kwargs(model, i, layer_kwargs))
        block.to("meta")
        return_freed_memory()
    total_nll, total_tokens = 0.0, 0
    for window, states in zip(windows, hidden):
        logits = adapter.head_logits(model, states.unsqueeze(0))[0, :-1].float()
        total_nll += float(F.cross_entropy(logits, window[1:].to(logits.device), reduction="sum"))
        total_tokens += window.numel() - 1
    return math.exp(total_nll / total_tokens)
