"""The method API (rptq.method_api, rptq.methods): every flag reaches what a checkpoint records, every method's
declarations are consistent, and a method module dropped into rptq/methods/ is found and runs with no other
file touched."""
import dataclasses
import json
import textwrap

import pytest
import torch

import main as cli
from rptq import methods
from rptq.checkpoint_info import saved_by_flag
from rptq.flags import build_config
from rptq.method_api import flags_of
from tests.helpers import inject_opt_outliers, tiny_opt

# Flags that choose what is evaluated, where things go, or how the run behaves, not what the quantized model is:
# free with --load_quantized and absent from quant.json's config by design.
FREE = {"model", "eval_ppl", "eval_base_ppl", "ppl_datasets", "tasks", "tasks_source", "task_bos", "num_fewshot",
        "limit", "seqlen", "multigpu", "offload_dir", "max_memory", "save_quantized", "load_quantized", "export",
        "act_dist_plot", "plot_layers", "no_resume", "cache_dir", "output_path", "device", "no_progress", "help"}
EXTRAS = ([], ["--w_quantizer", "gptqt", "--wbits", "3"], ["--w_clip", "learned"])  # what some flags need


def _config(argv):
    return build_config(cli.build_parser().parse_args(["tiny", *argv]))


def _at(flat: dict, path):
    for key in path:
        flat = flat[key]
    return flat


def _other_values(flag, default) -> list:
    """Values of the flag other than its default that its own check accepts."""
    if flag.const is not None:
        return [flag.const]
    if flag.choices:
        candidates = list(flag.choices)
    elif isinstance(default, str):
        candidates = ["1", "13"]
    elif isinstance(default, int):
        candidates = [default * 2, default + 1, 1, 4]
    else:
        candidates = [default / 2, 0.5, 1.0]
    return [c for c in candidates if c != default and not (flag.check and flag.check(c))]


def test_every_flag_is_recorded_or_free():
    """A flag that is neither recorded in quant.json nor declared free would be silently accepted with
    --load_quantized whatever the checkpoint holds."""
    dests = {a.dest for a in cli.build_parser()._actions}
    recorded = set(saved_by_flag())
    assert dests - recorded - FREE == set(), "flags neither recorded in quant.json nor free"
    assert recorded - dests == set(), "recorded flags the parser does not have"
    flat = _config([]).flat()
    for flag, paths in saved_by_flag().items():
        for path in paths:
            _at(flat, path)  # every recorded place exists in a default run's config


@pytest.mark.parametrize("flag_name", sorted(f.name for cls in methods.settings_classes().values()
                                             for _, f in flags_of(cls)))
def test_every_method_flag_reaches_the_recorded_config(flag_name):
    """Given under a preset that runs what it needs, the flag's value is what results.json and quant.json
    record at its declared place."""
    (name, field), = saved_by_flag()[flag_name]
    flag = dict((f.name, f) for _, f in flags_of(methods.settings_classes()[name]))[flag_name]
    default = getattr(methods.settings_classes()[name](), field)
    for value in _other_values(flag, default):
        argv = [f"--{flag_name}"] if flag.const is not None else [f"--{flag_name}", str(value)]
        for preset in methods.method_names():
            for extra in EXTRAS:
                try:
                    cfg = _config(["--method", preset, *extra, *argv])
                except Exception:  # noqa: BLE001  (a preset that does not run what the flag needs: refused)
                    continue
                assert _at(cfg.flat(), (name, field)) == value
                return
    pytest.fail(f"no preset accepts --{flag_name}")


def test_every_preset_names_declared_steps_and_policies():
    for name in methods.method_names():
        cfg = methods.preset_config(name)
        assert all(s in methods.steps() for s in cfg.transforms), name
        assert cfg.abits_policy in methods.policies(), name
        for step in cfg.transforms:
            assert all(r in cfg.transforms for r in methods.step(step).requires), (name, step)


TOY = '''
    """A toy method for the registry test: one flag, one block step that scales the first linear input."""
    from dataclasses import dataclass
    from typing import ClassVar

    import torch

    from quant.transforms import Scale

    from ..method_api import Method, Needs, Step, positive, setting


    @dataclass(frozen=True)
    class ToySettings:
        namespace: ClassVar[str] = "toy"
        factor: float = setting(2.0, "toy_factor", "the toy's scale", type=float, check=positive,
                                needs=Needs(steps=("toy_scale",)))


    def toy_scale(ctx):
        point = ctx.spec.norm_edges[0].point
        channels = ctx.spec.hidden_size
        ctx.apply(point, Scale(torch.full((channels,), ctx.cfg.of(ToySettings).factor)), step="toy_scale")
        ctx.decisions.setdefault(point, {})["toy"] = ctx.cfg.of(ToySettings).factor


    METHOD = Method(name="toy", summary="Toy (a test)", settings=ToySettings,
                    steps=(Step("toy_scale", block=toy_scale),),
                    presets={"toy": dict(transforms=("toy_scale",), abits_policy="uniform", w_quantizer="rtn")})
'''


@pytest.fixture
def toy_method(tmp_path, monkeypatch):
    package = tmp_path / "extra"
    package.mkdir()
    (package / "toy.py").write_text(textwrap.dedent(TOY))
    monkeypatch.setattr(methods, "__path__", [*methods.__path__, str(package)])
    cached = [methods.modules, methods.presets, methods.steps, methods.policies, methods.settings_classes]
    for fn in cached:
        fn.cache_clear()
    yield
    for fn in cached:
        fn.cache_clear()


def test_a_method_file_is_discovered_and_runs(toy_method):
    """One file declares settings, flag, step and preset: the parser, the flag checks, the checkpoint record
    and the pipeline pick it up."""
    from models.registry import adapter_for
    from rptq.pipeline import quantize_model

    cfg = _config(["--method", "toy", "--toy_factor", "3"])
    assert cfg.quant.flat()["toy"] == {"factor": 3.0} and saved_by_flag()["toy_factor"] == (("toy", "factor"),)
    with pytest.raises(Exception, match="--toy_factor is used only with the toy_scale step"):
        _config(["--toy_factor", "3"])
    with pytest.raises(Exception, match="--toy_factor must be positive"):
        _config(["--method", "toy", "--toy_factor", "-1"])
    model = inject_opt_outliers(tiny_opt(seed=0, hidden=64, layers=2, heads=4, ffn=128), seed=1)
    ids = torch.randint(4, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    fp = dataclasses.replace(cfg.quant, wbits=16, abits=16)
    report = quantize_model(model, adapter_for(model.config), ids, fp, progress=False)
    assert report.decisions()[0]["points"]["qkv_in"]["toy"] == 3.0
    assert report.decisions()[0]["placements"][0] == {"point": "qkv_in", "transform": "scale", "where": "norm",
                                                       "step": "toy_scale"}
    with torch.no_grad():
        assert (model(ids).logits - ref).abs().max() < 1e-4  # the scale folded exactly
    json.dumps(cfg.flat())
