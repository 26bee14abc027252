"""Figure helpers shared by the stages: a headless pyplot, one way to save a figure, and the readability check
every saved figure carries.

Figures are read at notebook width: a notebook and the HTML report show an image at its own size up to about
:data:`NOTEBOOK_WIDTH_PX` pixels and scale wider ones down, text included. :func:`save_figure` therefore records in
each PNG (a text chunk, :data:`READABILITY_KEY`) the figure's smallest font, its dpi and every legend entry drawn
alike under two labels; :func:`check_figure` reads it back and names what makes the figure hard to read: wider
than :data:`MAX_ASPECT` times its height, a font below :data:`MIN_FONT_PX` pixels once scaled to notebook width,
or two legend entries (colour, line style, marker) that cannot be told apart.

Usage::

    title = figure_title("LongWrite-Ruler", prof, "base, sft", data=STAND_IN)
    plt = pyplot()
    fig, ax = plt.subplots()
    ...
    return save_figure(fig, figures_dir / "name.png")

    python -m lwlib.plots check figures/smoke         # every PNG of a folder; exit 1 naming the unreadable ones
"""

from __future__ import annotations

import argparse
import io
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .runs import atomic_write_bytes

NOTEBOOK_WIDTH_PX = 900   # the width a notebook or the report shows a figure at (wider images are scaled down)
MIN_FONT_PX = 9.0         # the smallest text allowed, in pixels at that width
MAX_ASPECT = 2.5          # width / height
READABILITY_KEY = "lwlib:readability"


def pyplot():
    """``matplotlib.pyplot`` with the non-interactive Agg backend (unless a notebook already chose one)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def panel_grid(n: int, ncols: int = 3, panel: tuple[float, float] = (3.4, 3.1), extra: tuple[float, float] = (0.6, 1.0),
               **kwargs: Any):
    """``(fig, axes)``: ``n`` panels wrapped in rows of at most ``ncols`` (unused cells hidden), each
    ``panel`` inches, plus ``extra`` inches for titles and labels; ``axes`` is a flat list of the ``n`` panels.
    ``kwargs`` go to ``plt.subplots`` (``sharex``, ``sharey``)."""
    plt = pyplot()
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, grid = plt.subplots(nrows, ncols, figsize=(panel[0] * ncols + extra[0], panel[1] * nrows + extra[1]),
                             squeeze=False, **kwargs)
    flat = [ax for row in grid for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


@dataclass
class ModelGrid:
    """Panels for labels ``"<model> (<decoding>)"``: ``labels`` in reading order, ``ncols`` per row."""

    labels: list[str]
    ncols: int


def model_grid(labels: list[str], max_cols: int = 3) -> ModelGrid:
    """A row per decoding and a column per model when every label reads ``"<model> (<decoding>)"``
    (:func:`lwlib.decodings.model_label`), two or more decodings and at most ``max_cols`` models; else the labels
    as given, in rows of ``max_cols``. ``model_grid(["base (paper)", "sft (paper)", "base (loopfree)"])`` puts
    base and sft side by side in the first row."""
    parsed = [re.fullmatch(r"(.+) \(([^()]+)\)", x) for x in labels]
    if all(parsed):
        models = list(dict.fromkeys(m.group(1) for m in parsed))
        decs = list(dict.fromkeys(m.group(2) for m in parsed))
        if len(decs) > 1 and len(models) <= max_cols:
            pos = {(m.group(1), m.group(2)): x for m, x in zip(parsed, labels)}
            if len(pos) == len(labels) == len(models) * len(decs):
                return ModelGrid([pos[(m, d)] for d in decs for m in models], len(models))
    return ModelGrid(list(labels), min(max_cols, max(len(labels), 1)))


def distinct_style(k: int) -> dict[str, Any]:
    """Line style number ``k``: colour, line style and marker chosen so that no two of the first 40 are alike,
    and curves that coincide stay visible (a dashed or dotted line over a solid one)."""
    return {"color": f"C{k % 10}", "linestyle": ("-", "--", "-.", ":")[k % 4],
            "marker": ("o", "s", "^", "D", "v", "P", "X", "*")[(k + k // 10) % 8]}


def _legend_key(handle: Any) -> tuple:
    """How a legend handle is drawn: type, colours, line style, marker, hatch."""
    from matplotlib.colors import to_hex

    def hexes(c: Any) -> tuple:
        try:
            import numpy as np

            arr = np.atleast_2d(np.asarray(c, dtype=float)) if not isinstance(c, str) else [c]
            return tuple(to_hex(x, keep_alpha=False) for x in arr[:1])
        except (ValueError, TypeError):
            return (str(c),)

    kind = type(handle).__name__
    if hasattr(handle, "get_linestyle") and hasattr(handle, "get_marker"):  # Line2D
        ls = handle.get_linestyle() if handle.get_linewidth() > 0 else "None"
        return (kind, hexes(handle.get_color()), ls, str(handle.get_marker()),
                hexes(handle.get_markerfacecolor()) if str(handle.get_marker()) not in ("None", "") else ())
    if hasattr(handle, "get_facecolor") and hasattr(handle, "get_hatch"):  # Patch (bars)
        return (kind, hexes(handle.get_facecolor()), hexes(handle.get_edgecolor()), handle.get_hatch())
    if hasattr(handle, "get_facecolors"):  # a collection (scatter)
        fc = handle.get_facecolors()
        paths = handle.get_paths() if hasattr(handle, "get_paths") else []
        shape = tuple(round(float(v), 2) for v in paths[0].vertices.ravel()[:16]) if len(paths) else ()
        return (kind, hexes(fc) if len(fc) else ("none",), hexes(handle.get_edgecolors()), shape)
    return (kind, id(handle))


def legend_clashes(fig) -> list[list[str]]:
    """Groups of legend labels (over all the figure's legends) whose entries are drawn alike; [] when every
    entry can be told apart."""
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None] + list(fig.legends)
    by_key: dict[tuple, set[str]] = {}
    for leg in legends:
        handles = getattr(leg, "legend_handles", None) or getattr(leg, "legendHandles", [])
        for h, t in zip(handles, leg.get_texts()):
            if h is None:
                continue
            by_key.setdefault(_legend_key(h), set()).add(t.get_text())
    return [sorted(v) for v in by_key.values() if len(v) > 1]


def readability(fig, dpi: int) -> dict[str, Any]:
    """What :func:`check_figure` needs about a laid-out figure: smallest font (points), dpi, legend clashes."""
    from matplotlib.text import Text

    sizes = [t.get_fontsize() for t in fig.findobj(Text)
             if t.get_visible() and t.get_text().strip() and (t.axes is None or t.axes.get_visible())]
    return {"min_font_pt": min(sizes) if sizes else None, "dpi": dpi, "legend_clashes": legend_clashes(fig)}


def save_figure(fig, path: str | Path, dpi: int = 130) -> Path:
    """Lay out ``fig`` (tight layout unless it has a layout engine of its own), write it to ``path`` (parent folders
    created; atomically, :func:`lwlib.runs.atomic_write_bytes`; the format from the suffix, default png; a PNG carries
    :func:`readability`), close it, return the path."""
    path = Path(path)
    if fig.get_layout_engine() is None:
        fig.tight_layout()
    fmt = path.suffix.lstrip(".").lower() or "png"
    meta = {READABILITY_KEY: json.dumps(readability(fig, dpi))} if fmt == "png" else None
    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=dpi, bbox_inches="tight", metadata=meta)  # long titles stay inside the image
    pyplot().close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def check_figure(path: str | Path) -> list[str]:
    """What makes the PNG ``path`` hard to read at notebook width ([] when nothing): aspect ratio above
    :data:`MAX_ASPECT`, a font below :data:`MIN_FONT_PX` pixels at :data:`NOTEBOOK_WIDTH_PX`, legend entries drawn
    alike; a PNG that :func:`save_figure` did not write says so."""
    from PIL import Image

    with Image.open(path) as im:
        w, h = im.size
        raw = (getattr(im, "text", None) or im.info).get(READABILITY_KEY)
    problems = []
    if w > MAX_ASPECT * h:
        problems.append(f"{w}x{h} pixels: width/height {w / h:.2f} > {MAX_ASPECT} (make a grid of panels)")
    if raw is None:
        return problems + ["no readability record (not written by lwlib.plots.save_figure)"]
    info = json.loads(raw)
    if info.get("min_font_pt"):
        px = info["min_font_pt"] / 72 * info["dpi"] * min(1.0, NOTEBOOK_WIDTH_PX / w)
        if px < MIN_FONT_PX - 1e-6:
            problems.append(f"smallest text {info['min_font_pt']:g} pt is {px:.1f} px at {NOTEBOOK_WIDTH_PX} px "
                            f"width (< {MIN_FONT_PX:g}): larger fonts or a narrower figure")
    for labels in info.get("legend_clashes") or []:
        problems.append(f"legend entries drawn alike: {', '.join(map(repr, labels))}")
    return problems


def check_figures(folder: str | Path) -> dict[str, list[str]]:
    """:func:`check_figure` for every PNG in ``folder``: ``{file name: problems}`` for the hard-to-read ones."""
    out = {}
    for p in sorted(Path(folder).glob("*.png")):
        problems = check_figure(p)
        if problems:
            out[p.name] = problems
    return out


STAND_IN = "human-written public-domain passages (stand-in for LongWriter-6k)"


def figure_title(what: str, profile, models: str = "", data: str = "") -> str:
    """A title that states the profile and, outside the paper profile, that the model is tiny; ``data`` names
    the long-output data where it is not the paper's (e.g. :data:`STAND_IN`)."""
    note = "" if profile.name == "paper" else f"\nprofile {profile.name}: small-model run ({profile.model}), not the paper's numbers"
    src = f"\nSFT data: {data}" if data else ""
    return f"{what}{' - ' + models if models else ''}{note}{src}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lwlib.plots", description="Check that figures are readable at "
                                 "notebook width (lwlib.plots.check_figure).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ck = sub.add_parser("check", help="check every PNG of the folders (or the files) given")
    ck.add_argument("paths", nargs="+")
    args = ap.parse_args(argv)
    bad = 0
    for p in map(Path, args.paths):
        found = check_figures(p) if p.is_dir() else {p.name: check_figure(p)}
        for name, problems in found.items():
            if problems:
                bad += 1
                print(f"{p / name if p.is_dir() else p}: " + "; ".join(problems))
    print(f"{bad} figure(s) hard to read" if bad else "every figure is readable at notebook width")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
