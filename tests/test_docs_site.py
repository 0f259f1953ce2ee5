"""The docs build as a site in strict mode (a broken link, a missing anchor or a page left out of the navigation
fails), and the README's own links, which the site does not see, point at files that exist."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_mkdocs_builds_the_docs_strictly(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "site" / "methods" / "flatquant" / "index.html").is_file()


def test_readme_links_resolve():
    text = (ROOT / "README.md").read_text()
    links = [t for t in re.findall(r"\]\(([^)\s]+)\)", text) if not t.startswith(("http://", "https://", "#"))]
    assert len(links) > 15
    missing = [t for t in links if not (ROOT / t.split("#")[0]).exists()]
    assert not missing, missing


def test_the_docs_name_no_file_outside_the_repository():
    """Notes outside the repository (the team's shared method notes) and internal issue numbers mean nothing
    to a reader."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "docs/methods").glob("*.md"))]
    for page in pages:
        # the generated blocks quote benchmark reports verbatim; those are data, checked where they are made
        text = re.sub(r"<!-- generated:(\S+) begin.*?<!-- generated:\1 end -->", "", page.read_text(), flags=re.S)
        assert "shared/methods" not in text, page
        assert not re.search(r"\bissue #\d+", text), page


def test_every_method_preset_has_its_page_and_results_json_names_it():
    from rptq import methods
    from rptq.run_report import method_info

    for name in methods.method_names():
        page = methods.doc_page(name)
        assert (ROOT / page).is_file(), page
        assert method_info(methods.preset_config(name))["doc"] == page
    assert methods.doc_page("rotation") == "docs/methods/duquant.md"  # a preset of the DuQuant module
