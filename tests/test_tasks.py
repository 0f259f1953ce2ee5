"""Zero-shot evaluation through lm-eval 0.4: end to end offline, results, table, bad input."""
import contextlib
import json
import math
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest

from eval import task_mirrors, tasks
from common.errors import UserError
from tests.helpers import gpt2_tokenizer, tiny_opt


@pytest.fixture(scope="session")
def mirror_cache(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "task_mirror_cache"


@pytest.fixture(scope="session")
def model_and_tokenizer(tmp_path_factory):
    return tiny_opt(seed=0), gpt2_tokenizer(tmp_path_factory.mktemp("tok"))


def _check_metrics(row):
    assert row, "no metrics"
    for key, value in row.items():
        assert type(value) is float and math.isfinite(value), (key, value)
        if key.endswith("_stderr"):
            assert value >= 0
        elif key.startswith("acc"):
            assert 0.0 <= value <= 1.0
        elif key == "perplexity":
            assert value > 0


def test_every_mirrored_task_end_to_end_offline(model_and_tokenizer, mirror_cache):
    model, tok = model_and_tokenizer
    names = list(task_mirrors.MIRRORS)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = tasks.evaluate_tasks(model, tok, names, limit=3, source="local", batch_size=4,
                               device="cpu", seed=0, cache_dir=str(mirror_cache))
    assert list(res) == names
    for name in names:
        _check_metrics(res[name])
        assert {"acc", "acc_stderr"} <= set(res[name])
    for name in ("piqa", "arc_easy", "arc_challenge", "openbookqa", "hellaswag"):
        assert {"acc_norm", "acc_norm_stderr"} <= set(res[name])
    # the offline LAMBADA variant has lambada_openai's metrics
    assert {"acc", "acc_stderr", "perplexity", "perplexity_stderr"} <= set(res["lambada_flat"])
    json.dumps(res, allow_nan=False)
    assert all((before[k] == v).all() for k, v in model.state_dict().items())

    again = tasks.evaluate_tasks(model, tok, ["piqa", "boolq"], limit=3, source="local", batch_size=1,
                                 cache_dir=str(mirror_cache))
    assert again["piqa"] == pytest.approx(res["piqa"]) and again["boolq"] == pytest.approx(res["boolq"])


def test_lambada_definition_reports_perplexity(model_and_tokenizer, tmp_path):
    """lambada_openai is not mirrored (see UNAVAILABLE_OFFLINE), but its built-in definition and
    our result handling are exercised on a local file with the same `text` field."""
    from lm_eval.tasks import TaskManager

    model, tok = model_and_tokenizer
    texts = ["The cat sat quietly on the warm mat", "She opened the door and walked into the garden",
             "After the long winter the river finally began to thaw"]
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    conf = tmp_path / "conf"
    conf.mkdir()
    cfg = {"include": str(task_mirrors.builtin_task_yaml("lambada_openai")), "task": "lambada_local_check",
           "dataset_path": "json", "dataset_name": None,
           "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(tmp_path / "hf")}}
    (conf / "lambada_local_check.yaml").write_text(json.dumps(cfg))
    manager = TaskManager(include_path=str(conf), include_defaults=False)
    task = manager.load_task_or_group(["lambada_local_check"])["lambada_local_check"]
    doc = task.eval_docs[0]
    assert task.doc_to_text(doc) == "The cat sat quietly on the warm"
    assert task.doc_to_target(doc) == " mat"

    res = tasks.run_lm_eval(model, tok, ["lambada_local_check"], manager, bootstrap_iters=100)
    row = res["lambada_local_check"]
    assert {"perplexity", "perplexity_stderr", "acc", "acc_stderr"} <= set(row)
    _check_metrics(row)


def test_lambada_offline_is_refused(model_and_tokenizer, mirror_cache):
    model, tok = model_and_tokenizer
    with pytest.raises(UserError, match="lambada_openai is not available offline") as err:
        tasks.evaluate_tasks(model, tok, ["piqa", "lambada_openai"], limit=2, source="local",
                             cache_dir=str(mirror_cache))
    msg = str(err.value)
    assert "\n" not in msg and "piqa" in msg and "served offline as lambada_flat" in msg
    assert tasks.check_tasks("lambada_flat,piqa", source="local") == "local"


def test_unknown_task_lists_available(model_and_tokenizer, mirror_cache):
    model, tok = model_and_tokenizer
    with pytest.raises(UserError) as err:
        tasks.evaluate_tasks(model, tok, ["piqaa"], source="local", cache_dir=str(mirror_cache))
    msg = str(err.value)
    assert "unknown task 'piqaa'" in msg and "\n" not in msg
    for name in task_mirrors.MIRRORS:
        assert name in msg
    assert "did you mean" in msg and "piqa" in msg


def test_builtin_task_without_mirror_is_refused_offline(model_and_tokenizer, mirror_cache):
    model, tok = model_and_tokenizer
    with pytest.raises(UserError, match="sciq is not available offline"):
        tasks.evaluate_tasks(model, tok, ["sciq"], source="local", cache_dir=str(mirror_cache))


def test_fewshot_offline_is_refused(model_and_tokenizer, mirror_cache):
    model, tok = model_and_tokenizer
    with pytest.raises(UserError, match="train split"):
        tasks.evaluate_tasks(model, tok, ["piqa"], num_fewshot=5, source="local", cache_dir=str(mirror_cache))


@pytest.mark.parametrize("kwargs,match", [
    ({"tasks": []}, "no tasks"),
    ({"tasks": ["piqa"], "source": "internet"}, "unknown tasks source"),
    ({"tasks": ["piqa"], "num_fewshot": -1}, "num_fewshot"),
    ({"tasks": ["piqa"], "limit": 0}, "limit"),
    ({"tasks": ["piqa"], "bos": "yes"}, "unknown bos setting 'yes'; use one of: auto, on, off"),
])
def test_bad_arguments(model_and_tokenizer, kwargs, match):
    model, tok = model_and_tokenizer
    with pytest.raises(UserError, match=match):
        tasks.evaluate_tasks(model, tok, **kwargs)


def test_auto_goes_local_at_once_when_offline_env(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    assert tasks.resolve_source("auto") == "local"
    assert time.perf_counter() - start < 0.5
    assert tasks.resolve_source("hub") == "hub"


def test_flatten_results_keeps_numbers_only():
    raw = {"results": {"piqa": {"alias": "piqa", "name": "piqa", "sample_len": 3, "acc,none": 0.5,
                                "acc_stderr,none": "N/A", "acc_norm,none": 1}}}
    assert tasks.flatten_results(raw) == {"piqa": {"acc": 0.5, "acc_norm": 1.0}}


def test_format_task_table_paper_layout():
    results = {"hellaswag": {"acc": 0.3, "acc_norm": 0.35},
               "boolq": {"acc": 0.6, "acc_stderr": 0.01},
               "lambada_openai": {"acc": 0.5, "acc_stderr": 0.007, "perplexity": 12.3456, "perplexity_stderr": 0.4},
               "piqa": {"acc": 0.7123, "acc_stderr": 0.0105, "acc_norm": 0.71, "acc_norm_stderr": 0.0106}}
    lines = tasks.format_task_table(results).splitlines()
    assert lines[0] == "| metric | lambada_openai | piqa | boolq | hellaswag |"
    assert lines[1] == "|---|---:|---:|---:|---:|"
    assert lines[2] == "| acc (%) | 50.00 ± 0.70 | 71.23 ± 1.05 | 60.00 ± 1.00 | 30.00 |"
    assert lines[3] == "| acc_norm (%) | – | 71.00 ± 1.06 | – | 35.00 |"
    assert lines[4] == "| perplexity | 12.35 ± 0.40 | – | – | – |"
    assert tasks.PAPER_TASKS == ("lambada_openai", "piqa", "arc_easy", "arc_challenge", "openbookqa", "boolq")


def test_hub_source_uses_builtin_registry(model_and_tokenizer, monkeypatch):
    """Online, names are checked against lm-eval's full registry and the built-in tasks run
    unchanged (the run itself is stubbed: the hub is unreachable from the test machine)."""
    model, tok = model_and_tokenizer
    with pytest.raises(UserError, match="unknown task 'arc_easyy'.*did you mean arc_easy"):
        tasks.evaluate_tasks(model, tok, ["arc_easyy"], source="hub")

    seen = {}

    def fake_run(model, tokenizer, names, manager, **kwargs):
        seen.update(names=names, manager=manager, kwargs=kwargs)
        return {n: {"acc": 0.5} for n in names}

    monkeypatch.setattr(tasks, "run_lm_eval", fake_run)
    out = tasks.evaluate_tasks(model, tok, "lambada_openai,piqa", num_fewshot=5, limit=10, source="hub", seed=3)
    assert out == {"lambada_openai": {"acc": 0.5}, "piqa": {"acc": 0.5}}
    assert seen["names"] == ["lambada_openai", "piqa"]
    assert "lambada_openai" in seen["manager"].all_tasks and len(seen["manager"].all_tasks) > 1000
    assert seen["kwargs"]["num_fewshot"] == 5 and seen["kwargs"]["limit"] == 10 and seen["kwargs"]["seed"] == 3
    assert seen["kwargs"]["add_bos"] is False  # an OPT model: no BOS, as in the reference
    tasks.evaluate_tasks(model, tok, "piqa", source="hub", bos="on")
    assert seen["kwargs"]["add_bos"] is True


# ---------------------------------------------------------------- BOS in lm-eval contexts
class _Llama:  # effective_bos reads only model.config.model_type
    class config:
        model_type = "llama"


@contextlib.contextmanager
def _first_tokens(model):
    """Collects the first input id of every sequence given to the model's forward."""
    seen: list[int] = []

    def hook(module, args, kwargs):
        ids = args[0] if args else kwargs["input_ids"]
        seen.extend(ids[:, 0].tolist())

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def _piqa_first_tokens(model, tok, cache, **kwargs) -> set[int]:
    """First token of every sequence lm-eval scores for 2 piqa documents (2 choices each)."""
    with _first_tokens(model) as seen:
        tasks.evaluate_tasks(model, tok, ["piqa"], limit=2, source="local", cache_dir=str(cache), **kwargs)
    assert len(seen) == 4
    return set(seen)


def test_bos_follows_reference_for_opt(model_and_tokenizer, mirror_cache, tmp_path):
    """OPT's own tokenizer prepends its BOS (`</s>`, id 2) by default; a GPT-2 tokenizer with
    add_bos_token=True behaves the same way (its BOS is id 50256). HFLM's default keeps that BOS;
    the reference (lm-eval 0.3, add_special_tokens=False) had none: "auto" matches the reference."""
    from transformers import GPT2Tokenizer

    from tests.helpers import gpt2_tokenizer_dir

    model, plain = model_and_tokenizer
    opt_like = GPT2Tokenizer.from_pretrained(str(gpt2_tokenizer_dir(tmp_path / "tok")), add_bos_token=True)
    bos = opt_like.bos_token_id
    assert tasks.tokenizer_adds_bos(opt_like) and not tasks.tokenizer_adds_bos(plain)

    # lm-eval 0.4's own default: every context starts with BOS
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_mirrors.write_task_configs(["piqa"], mirror_cache)),
                          include_defaults=False)
    with _first_tokens(model) as seen:
        tasks.run_lm_eval(model, opt_like, ["piqa"], manager, limit=2, add_bos=None)
    assert len(seen) == 4 and set(seen) == {bos}

    assert tasks.effective_bos(model, opt_like, "auto") is False
    auto = _piqa_first_tokens(model, opt_like, mirror_cache)
    assert auto == {opt_like.encode("Question", add_special_tokens=False)[0]}  # piqa: "Question: ..."
    assert auto == _piqa_first_tokens(model, opt_like, mirror_cache, bos="off")
    assert _piqa_first_tokens(model, opt_like, mirror_cache, bos="on") == {bos}
    # "on" also works for a tokenizer that does not add BOS itself, without changing it
    assert _piqa_first_tokens(model, plain, mirror_cache, bos="on") == {plain.bos_token_id}
    assert not tasks.tokenizer_adds_bos(plain)
    assert tasks.effective_bos(model, plain, "on") is True and tasks.effective_bos(model, plain, "off") is False


def test_bos_auto_keeps_the_tokenizer_convention_for_other_models(model_and_tokenizer, tmp_path):
    from transformers import GPT2Tokenizer

    from tests.helpers import gpt2_tokenizer_dir

    _, plain = model_and_tokenizer
    with_bos = GPT2Tokenizer.from_pretrained(str(gpt2_tokenizer_dir(tmp_path / "tok")), add_bos_token=True)
    assert tasks.effective_bos(_Llama(), with_bos, "auto") is True
    assert tasks.effective_bos(_Llama(), plain, "auto") is False
    assert tasks.bos_override(_Llama(), "auto") is None  # HFLM's own default, whatever the tokenizer
    assert tasks.bos_override(_Llama(), "off") is False and tasks.bos_override(_Llama(), "on") is True
    with pytest.raises(UserError, match="unknown bos setting 'yes'"):
        tasks.effective_bos(_Llama(), plain, "yes")
