"""Figures and their PNG files for the eval pictures: each Figure is built on its own Agg canvas without
pyplot, so there is no global figure registry to leak between calls or threads; PNGs are written
atomically, and one colour per run keeps a run recognisable across charts."""
from __future__ import annotations

import io
from pathlib import Path

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from common.atomic import atomic_write

DPI = 100


def new_figure(width: float, height: float) -> Figure:
    """A Figure on its own Agg canvas (no pyplot), laid out with constrained layout."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_png(fig: Figure, path) -> Path:
    """Write fig as PNG through a temporary file, so a reader never sees half an image."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=DPI))
    return Path(path)


def png_bytes(fig: Figure) -> bytes:
    """fig as PNG bytes (for pages that inline their images)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def run_colors(labels) -> dict[str, tuple]:
    """One colour per run label, so a run looks the same in every chart of a report."""
    labels = list(dict.fromkeys(labels))
    cmap = colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


def finish(fig: Figure, path) -> Figure:
    """Save fig when given a path; return it either way."""
    if path is not None:
        save_png(fig, path)
    return fig
