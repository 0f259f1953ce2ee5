"""One self-contained HTML page for a set of runs: the paper-layout table, perplexity per run,
the per-layer error curves of every run overlaid, and each run's own pictures (its plots/*.png).
Images are inlined as base64 and the CSS is inline, so the page can be mailed or archived alone.

    python -m eval.report DIR [DIR ...] --out report.html [--metric sqnr_db|rel_mse] [--screenshot PNG]
"""
from __future__ import annotations

import base64
import html
import os
import re
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from common.errors import UserError
from eval.cli import Parser, write_atomic
from eval.error_plots import METRICS, plot_layer_errors, plot_ppl_chart
from eval.figures import png_bytes, run_colors
from eval.runs import load_runs, method_notes, order_key, row_label
from eval.table import render_table

CSS = """
body { font-family: system-ui, -apple-system, "DejaVu Sans", sans-serif; font-size: 15px; color: #222;
       max-width: 1240px; margin: 1.5em auto; padding: 0 1em; line-height: 1.45; }
h1 { font-size: 1.6em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 1.8em; }
table { border-collapse: collapse; margin: .8em 0; }
th, td { border: 1px solid #bbb; padding: .3em .7em; } th { background: #f0f0f0; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
tbody tr:nth-child(even) { background: #fafafa; }
figure { margin: 1em 0; } img { max-width: 100%; height: auto; border: 1px solid #e4e4e4; }
figcaption, .meta { color: #555; font-size: .9em; } code { background: #f4f4f4; padding: 0 .25em; }
"""


# ---------------------------------------------------------------- pieces
def run_label(run: dict) -> str:
    """Method and the paper's row name, plus notes where the run deviates from its method's defaults."""
    method = (run.get("method") or {}).get("name", "rptq")
    notes = method_notes(run)
    return f"{method} {row_label(run['config'])}" + (f" ({', '.join(notes)})" if notes else "")


def run_labels(runs: list[dict]) -> list[str]:
    """One label per run, the run's directory name appended where two would read the same."""
    labels = [run_label(r) for r in runs]
    return [f"{lab} [{Path(r['_path']).parent.name}]" if labels.count(lab) > 1 else lab
            for lab, r in zip(labels, runs)]


def _cells(line: str) -> list[str]:
    parts = re.split(r"(?<!\\)\|", line.strip())[1:-1]  # render_table escapes a literal | as \|
    return [p.strip().replace("\\|", "|") for p in parts]


def table_html(markdown: str) -> str:
    """eval.table.render_table's markdown (a pipe table, then free lines) as HTML."""
    lines = markdown.splitlines()
    rows = [ln for ln in lines if ln.startswith("|")]
    if len(rows) < 2:
        raise UserError("the results table is empty")
    right = [c.endswith(":") for c in _cells(rows[1])]
    cls = lambda i: ' class="num"' if i < len(right) and right[i] else ""  # noqa: E731
    head = "".join(f"<th{cls(i)}>{html.escape(c)}</th>" for i, c in enumerate(_cells(rows[0])))
    body = "".join("<tr>" + "".join(f"<td{cls(i)}>{html.escape(c)}</td>" for i, c in enumerate(_cells(r)))
                   + "</tr>\n" for r in rows[2:])
    rest = "".join(f"<p class=\"meta\">{html.escape(ln)}</p>" for ln in lines if ln.strip() and not ln.startswith("|"))
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>\n{rest}"


def img_html(png: bytes, alt: str, caption: str = "") -> str:
    data = base64.b64encode(png).decode("ascii")
    cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">{cap}</figure>\n'


def run_pngs(run: dict) -> list[Path]:
    root = Path(run["_path"]).parent
    return sorted((root / (run.get("plots") or {}).get("dir", "plots")).glob("*.png"))


# ---------------------------------------------------------------- the page
def build_report(runs: list[dict], metric: str = "sqnr_db") -> str:
    """The whole HTML page for runs as returned by eval.table.load_runs."""
    runs = sorted(runs, key=lambda r: (order_key(row_label(r["config"])), run_label(r), r["_path"]))  # table order
    labels = run_labels(runs)
    colors = run_colors(labels)
    models = sorted({str(r.get("model", "?")) for r in runs})
    parts = [f"<h1>Quantization report: {html.escape(', '.join(models))}</h1>",
             f"<p class=\"meta\">{len(runs)} runs; generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC "
             "by <code>python -m eval.report</code>.</p>",
             "<h2>Results</h2>", table_html(render_table(runs))]
    ppl = [(lab, r.get("ppl")) for lab, r in zip(labels, runs) if r.get("ppl")]
    parts.append("<h2>Perplexity</h2>")
    parts.append(img_html(png_bytes(plot_ppl_chart(ppl, title=f"Perplexity per run, {', '.join(models)}", colors=colors)),
                          "perplexity per run") if ppl else "<p>No run evaluated perplexity.</p>")
    errors = [(lab, r.get("layer_errors")) for lab, r in zip(labels, runs) if r.get("layer_errors")]
    parts.append("<h2>Per-layer error</h2>")
    if errors:
        fig = plot_layer_errors(errors, metric=metric, colors=colors,
                                title=f"Per-layer quantization error, {', '.join(models)}")
        parts.append(img_html(png_bytes(fig), "per-layer error, runs overlaid",
                              "Each block's output against the FP block on the same inputs; weight-only and "
                              "activation-only errors averaged over the block's linears / quantized points."))
    else:
        parts.append("<p>No run recorded per-layer errors.</p>")
    parts.append("<h2>Runs</h2>")
    for lab, run in zip(labels, runs):
        facts = ", ".join(f"{d} ppl {v:.2f}" for d, v in (run.get("ppl") or {}).items() if isinstance(v, (int, float)))
        parts.append(f"<h3>{html.escape(lab)}</h3><p class=\"meta\"><code>{html.escape(run['_path'])}</code>"
                     + (f"; {html.escape(facts)}" if facts else "") + "</p>")
        pngs = run_pngs(run)
        parts += [img_html(p.read_bytes(), f"{lab}: {p.stem}", p.name) for p in pngs]
        if not pngs:
            parts.append("<p class=\"meta\">No pictures (run with --act_dist_plot to draw them).</p>")
    title = html.escape(f"Quantization report: {', '.join(models)}")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title>"
            f"<style>{CSS}</style></head>\n<body>\n" + "\n".join(parts) + "\n</body></html>\n")


# ---------------------------------------------------------------- headless browser
def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    return None


def chromium(html_path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run headless Chromium on a local HTML file with a throwaway profile (root needs --no-sandbox)."""
    exe = find_chromium()
    if exe is None:
        raise UserError("chromium not found; install it (Debian: apt-get install -y chromium)")
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
               "--hide-scrollbars", f"--user-data-dir={profile}", *args, Path(html_path).resolve().as_uri()]
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise UserError(f"chromium did not finish within {timeout:.0f} s") from exc


def screenshot(html_path, png_path, width: int = 1280, height: int = 2000, dump_dom: bool = False) -> str:
    """Render html_path in headless Chromium and save a width x height PNG atomically; with
    dump_dom, the same launch also returns the DOM as loaded (one browser start, not two)."""
    dest = Path(png_path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".shot-") as tmp:
        shot = Path(tmp) / "shot.png"
        done = chromium(html_path, f"--window-size={width},{height}", f"--screenshot={shot}",
                        *(["--dump-dom"] if dump_dom else []))
        if done.returncode != 0 or not shot.exists():
            raise UserError(f"chromium failed (exit {done.returncode}): {done.stderr.strip()[-300:]}")
        os.replace(shot, dest)
    return done.stdout if dump_dom else ""


# ---------------------------------------------------------------- CLI
def main(argv=None) -> int:
    parser = Parser(prog="python -m eval.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="directories searched for results.json")
    parser.add_argument("--out", required=True, metavar="FILE.html", help="the report (written atomically)")
    parser.add_argument("--metric", choices=METRICS, default="sqnr_db", help="per-layer error axis")
    parser.add_argument("--screenshot", metavar="PNG", help="also render the page with headless Chromium")
    args = parser.parse_args(argv)
    try:
        if Path(args.out).is_dir():
            raise UserError(f"--out {args.out} is a directory; name the .html file to write")
        write_atomic(args.out, build_report(load_runs(args.dirs), args.metric))
        if args.screenshot:
            screenshot(args.out, args.screenshot)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}" + (f" and {args.screenshot}" if args.screenshot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
