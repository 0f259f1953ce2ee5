"""docs/cli.md is what the argument parser renders to, and it names every flag main.py accepts, each method's
under that method."""
from __future__ import annotations

import argparse

from docgen.cli_reference import PAGE, main, render
from rptq import methods
from rptq.cli import build_parser
from rptq.method_api import flags_of


def test_the_page_is_up_to_date():
    assert PAGE.read_text() == render(), "docs/cli.md is stale: run python -m docgen.cli_reference --write"


def test_every_flag_is_on_the_page_and_each_method_flag_under_its_method():
    text = render()
    options = [o for a in build_parser()._actions if not isinstance(a, argparse._HelpAction)
               for o in a.option_strings]
    assert len(options) > 60
    missing = [o for o in options if f"`{o}`" not in text]
    assert not missing
    sections = text.split("\n## ")
    for name, cls in methods.settings_classes().items():
        own = next(s for s in sections if s.startswith(f"{name} "))
        assert all(f"`--{flag.name}`" in own for _, flag in flags_of(cls)), name


def test_check_mode_fails_on_a_stale_page(tmp_path, monkeypatch, capsys):
    import docgen.cli_reference as ref

    stale = tmp_path / "cli.md"
    stale.write_text("# old\n")
    monkeypatch.setattr(ref, "PAGE", stale)
    assert main(["--check"]) == 1 and "out of date" in capsys.readouterr().err
    assert main(["--write"]) == 0 and main(["--check"]) == 0
