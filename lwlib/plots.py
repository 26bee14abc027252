"""Figure helpers shared by the stages: a headless pyplot and one way to save a figure.

Usage::

    title = figure_title("LongWrite-Ruler", prof, "base, sft", data=STAND_IN)
    plt = pyplot()
    fig, ax = plt.subplots()
    ...
    return save_figure(fig, figures_dir / "name.png")
"""

from __future__ import annotations

import io
from pathlib import Path

from .runs import atomic_write_bytes


def pyplot():
    """``matplotlib.pyplot`` with the non-interactive Agg backend (unless a notebook already chose one)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | Path, dpi: int = 130) -> Path:
    """Lay out ``fig``, write it to ``path`` (parent folders created; atomically, :func:`lwlib.runs.atomic_write_bytes`;
    the format from the suffix, default png), close it, return the path."""
    path = Path(path)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lstrip(".").lower() or "png", dpi=dpi,
                bbox_inches="tight")  # long two-line titles stay inside the image
    pyplot().close(fig)
    return atomic_write_bytes(path, buf.getvalue())


STAND_IN = "human-written public-domain passages (stand-in for LongWriter-6k)"


def figure_title(what: str, profile, models: str = "", data: str = "") -> str:
    """A title that states the profile and, outside the paper profile, that the model is tiny; ``data`` names
    the long-output data where it is not the paper's (e.g. :data:`STAND_IN`)."""
    note = "" if profile.name == "paper" else f"\nprofile {profile.name}: small-model run ({profile.model}), not the paper's numbers"
    src = f"\nSFT data: {data}" if data else ""
    return f"{what}{' - ' + models if models else ''}{note}{src}"
