"""The README's file tree matches the repository (every listed path exists, every source file is listed), and the figure
gallery (figures/README.md) describes every figure the notebooks write.

Usage: ``pytest tests/test_readme.py`` (no lwlib import, milliseconds)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# files a newcomer must find in the tree: top-level scripts, the library, benchmarks, environment, notebooks
SOURCES = ["pyproject.toml", "run_all.sh", "test.sh", ".ci/run", "lwlib/*.py", "lwlib/*.json", "lwlib/profiles/*",
           "lwlib/prompts/*", "lwlib/templates/*", "benchmarks/*.py", "benchmarks/*.md", "env/*", "notebooks/*.ipynb",
           "tests/*.py"]


def tree_entries(readme: Path) -> list[str]:
    """Paths of the README's "## Files" block: the first column (up to two spaces) of each line not indented
    (continuations are), several paths separated by ", "."""
    text = readme.read_text(encoding="utf-8")
    if "## Files" not in text:
        raise AssertionError(f"{readme}: no '## Files' section")
    block = text.split("## Files", 1)[1].split("```")[1]
    out = []
    for line in block.splitlines():
        if line.strip() and not line[0].isspace():
            out += [p.strip() for p in re.split(r"\s{2,}", line.strip(), maxsplit=1)[0].split(", ")]
    return out


def covered(rel: str, entries: list[str]) -> bool:
    return any(rel == e or (e.endswith("/") and rel.startswith(e)) for e in entries)


def test_readme_tree_paths_exist():
    missing = [e for e in tree_entries(ROOT / "README.md") if not (ROOT / e).exists()]
    assert not missing, f"README.md '## Files' lists paths that do not exist: {missing}"


def test_readme_tree_lists_every_source_file():
    entries = tree_entries(ROOT / "README.md")
    files = sorted({p.relative_to(ROOT).as_posix() for pat in SOURCES for p in ROOT.glob(pat) if p.is_file()})
    files = [f for f in files if "__pycache__" not in f]
    unlisted = [f for f in files if not covered(f, entries)]
    assert not unlisted, f"README.md '## Files' does not list: {unlisted}"


def test_figure_gallery_describes_every_figure_the_notebooks_write():
    written = sorted({m for p in (ROOT / "notebooks").glob("*.ipynb")
                      for m in re.findall(r'"([a-z0-9_]+)\.png', p.read_text(encoding="utf-8"))})
    gallery = (ROOT / "figures" / "README.md").read_text(encoding="utf-8")
    assert len(written) >= 15 and [n for n in written if f"| `{n}` |" not in gallery] == []
