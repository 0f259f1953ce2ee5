"""Perplexity protocol, windows, calibration sampling, datasets."""
import math
import random
from types import SimpleNamespace

import pytest
import torch

import eval.data as data
from eval.ppl import perplexity
from common.errors import UserError


class FixedLM(torch.nn.Module):
    """Predicts token t+1 from token t with a fixed table: log p(next=j | cur=i) = table[i, j]."""

    def __init__(self, table):
        super().__init__()
        self.table = table

    def forward(self, ids, use_cache=False):
        return SimpleNamespace(logits=self.table[ids])


def test_ppl_matches_hand_computed_nll():
    # vocab 2; from token 0: p(0)=0.75, p(1)=0.25; from token 1: p(0)=0.5, p(1)=0.5
    table = torch.log(torch.tensor([[0.75, 0.25], [0.5, 0.5]]))
    windows = torch.tensor([[0, 0, 1, 1], [1, 0, 0, 0]])
    # predicted tokens per window: 3. NLLs: w0: -ln .75 - ln .25 - ln .5 ; w1: -ln .5 - ln .75 - ln .75
    nll = -(math.log(.75) + math.log(.25) + math.log(.5)) - (math.log(.5) + 2 * math.log(.75))
    assert perplexity(FixedLM(table), windows, progress=False) == pytest.approx(math.exp(nll / 6), rel=1e-6)
    # --limit 1 is normalised by the one window's 3 predictions, not by all windows
    nll0 = -(math.log(.75) + math.log(.25) + math.log(.5))
    assert perplexity(FixedLM(table), windows, limit=1, progress=False) == pytest.approx(math.exp(nll0 / 3))


def test_ppl_equals_gptq_normalisation():
    """GPTQ: exp(sum_w mean_loss_w * seqlen / (nwindows * seqlen)), the mean of per-window mean NLLs;
    with equal-length windows it is exactly exp(sum NLL / predicted tokens)."""
    gen = torch.Generator().manual_seed(0)
    table = torch.log_softmax(torch.randn(11, 11, generator=gen, dtype=torch.float64), dim=-1)
    seqlen = 6
    windows = torch.randint(0, 11, (4, seqlen), generator=gen)
    losses = [torch.nn.functional.cross_entropy(table[w[:-1]], w[1:]) for w in windows]  # HF's mean loss
    gptq = math.exp(float(sum(loss * seqlen for loss in losses)) / (len(windows) * seqlen))
    assert perplexity(FixedLM(table), windows, progress=False) == pytest.approx(gptq, rel=1e-6)  # window_nll works in fp32


def test_uniform_model_has_ppl_equal_to_vocab():
    table = torch.zeros(7, 7)
    windows = torch.randint(0, 7, (3, 11))
    assert perplexity(FixedLM(table), windows, progress=False) == pytest.approx(7.0)


def test_nonoverlapping_windows_drop_the_tail():
    ids = torch.arange(10)
    w = data.nonoverlapping_windows(ids, 3)
    assert w.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert data.nonoverlapping_windows(ids, 11).shape == (0, 11)


def test_calibration_windows_exact_count_and_seeded():
    ids = torch.arange(1000)
    a = data.random_windows(ids, 7, 50, random.Random(2))
    b = data.random_windows(ids, 7, 50, random.Random(2))
    c = data.random_windows(ids, 7, 50, random.Random(3))
    assert a.shape == (7, 50) and torch.equal(a, b) and not torch.equal(a, c)
    assert all(torch.equal(row, torch.arange(row[0], row[0] + 50)) for row in a)  # real contiguous text
    with pytest.raises(UserError, match="seqlen"):
        data.random_windows(torch.arange(50), 1, 50, random.Random(0))


def test_mix_gives_exactly_nsamples_real_windows(monkeypatch, tmp_path):
    (tmp_path / "a.txt").write_text(" ".join(f"w{i}" for i in range(3000)))
    (tmp_path / "b.txt").write_text(" ".join(f"v{i}" for i in range(3000)))
    monkeypatch.setattr(data, "MIX_SOURCES", (f"file:{tmp_path/'a.txt'}", f"file:{tmp_path/'b.txt'}", "ptb"))
    tok = _char_tokenizer()
    for n in (1, 2, 7, 128):
        w = data.calibration_windows(tok, "mix", n, 32, seed=2, cache_dir=str(tmp_path / "cache"))
        assert w.shape == (n, 32)
        assert (w != 0).any(dim=1).all()  # no all-zero filler rows (the reference padded with zeros)


def _char_tokenizer():
    class CharTok:
        special_tokens_map = {}

        def get_vocab(self):
            return {chr(i): i for i in range(32, 127)}

        def __call__(self, text):
            return SimpleNamespace(input_ids=[ord(c) % 256 + 1 for c in text])

    return CharTok()


def test_ptb_is_mikolov_text_and_eval_uses_validation():
    assert len(data._ptb_sentences("train")) == 42068
    assert len(data._ptb_sentences("validation")) == 3370
    assert len(data._ptb_sentences("test")) == 3761
    text = data.split_text("ptb", "eval")
    assert text.startswith("consumers may want to move their telephones") and text.count("\n\n") == 3369


def test_token_cache_is_keyed_and_reused(tmp_path):
    tok = _char_tokenizer()
    path = tmp_path / "t.txt"
    path.write_text("hello world " * 50)
    a = data.eval_windows(tok, f"file:{path}", 16, str(tmp_path))
    cached = list(tmp_path.glob("tokens-*.safetensors"))
    assert len(cached) == 1
    path.write_text("other text " * 50)  # new content: new key, not the stale entry
    b = data.eval_windows(tok, f"file:{path}", 16, str(tmp_path))
    assert not torch.equal(a, b) and len(list(tmp_path.glob("tokens-*.safetensors"))) == 2


def test_c4_skips_documents_not_longer_than_seqlen():
    tok = _char_tokenizer()
    docs = ["x" * 8, "y" * 9]  # 8 tokens: exactly seqlen, GPTQ would draw from an empty range
    w = data.c4_windows(tok, docs, 5, 8, random.Random(0))
    assert w.shape == (5, 8) and (w == ord("y") + 1).all()


def test_dataset_name_checks(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="unknown ppl dataset"):
        data.check_dataset_name("wikitext3", "ppl")
    with pytest.raises(UserError, match="does not exist"):
        data.check_dataset_name(f"file:{tmp_path/'missing.txt'}", "ppl")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(UserError, match="empty"):
        data.check_dataset_name(f"file:{tmp_path/'empty.txt'}", "calibration")
    monkeypatch.setattr(data, "hub_reachable", lambda: False)
    with pytest.raises(UserError, match="--ppl_datasets ptb"):
        data.check_dataset_name("wikitext2", "ppl")
    with pytest.raises(UserError, match="unreachable"):
        data.check_dataset_name("mix", "calibration")


def test_wiki_leads_splits_are_disjoint():
    train, test = data.split_text("wiki_leads", "train"), data.split_text("wiki_leads", "eval")
    assert len(test) > 100_000 and len(train) > 8 * len(test) * 0.8
    assert test.split("\n\n")[0] not in train
