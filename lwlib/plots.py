"""Figure helpers shared by the stages: a headless pyplot and one way to save a figure.

Usage::

    plt = pyplot()
    fig, ax = plt.subplots()
    ...
    return save_figure(fig, figures_dir / "name.png")
"""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """``matplotlib.pyplot`` with the non-interactive Agg backend (unless a notebook already chose one)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 130) -> Path:
    """Lay out ``fig``, write it to ``path`` (parent folders created), close it, return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, bbox_inches="tight")  # long two-line titles stay inside the image
    pyplot().close(fig)
    return path
