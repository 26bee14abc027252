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


def _json(rel: str):
    import json

    return json.loads((ROOT / rel).read_text(encoding="utf-8"))


def test_readme_results_match_the_result_files():
    """The numbers of the README's Results section are the committed result files' (rounded as written)."""
    text = (ROOT / "README.md").read_text(encoding="utf-8").split("## Results", 1)[1].split("## Honest limits")[0]
    num = lambda s: int(s.replace(",", ""))  # noqa: E731
    # gpu (Gemma-3-270M): p95 effective words of seed 0 per run of (a)
    m = re.search(r"seed 0: cap500 ([\d,]+), cap1000 ([\d,]+), cap2000 ([\d,]+), cap4000 ([\d,]+) \(base ([\d,]+)\)",
                  text)
    assert m, "README: the gpu sitting's line of (a) is not where this test looks"
    gpu = _json("results/gpu/sft/cap_experiment.json")["loopfree"]
    assert [num(x) for x in m.groups()[:4]] == [round(p) for p in gpu["by_seed"]["0"]["p95"]]
    assert gpu["runs"] == ["cap500", "cap1000", "cap2000", "cap4000"]
    base = _json("results/gpu/probe/base/loopfree/summary.json")["max_output_words_effective"]
    assert num(m.group(5)) == round(base)
    # the main run's p95 by seed, (h) and (d) decided "no", the others incomplete
    arms = _json("results/gpu/sft/arms.json")["loopfree"]
    p95 = " / ".join(f"{round(arms['by_seed'][str(k)]['sft']['p95']):,}" for k in arms["long_arm_seeds"])
    assert f"| {p95} by seed (none censored) | **no** |" in text
    assert not any(arms["by_seed"][str(k)]["sft"]["lower_bound"] for k in arms["long_arm_seeds"])
    f = arms["length_following"]
    assert f"Spearman {f['spearman']:.2f}, interval {f['lo']:.2f} .. {f['hi']:.2f} | **no** |" in text
    # (b) over the three seeds of both arms, decided "no"
    assert arms["seeds"] == [0, 1, 2]
    g = " / ".join(f"{round(arms['by_seed'][str(k)]['sft_general']['p95']):,}" for k in arms["seeds"])
    s = " / ".join(f"{round(arms['by_seed'][str(k)]['sft']['p95']):,}" for k in arms["seeds"])
    r = arms["ratio_long_over_general"]
    assert (f"general alone {g}, general + long {s} by seed: {r['value']:.2f}x, interval {r['lo']:.2f} .. "
            f"{r['hi']:.2f} | **no** |") in text
    verdicts = {r["id"]: r["reproduced"] for r in _json("results/gpu/claims.json")}
    assert verdicts == {"a_length_follows_sft_cap": None, "b_long_data_lifts_limit": False, "h_10000_words": False,
                        "d_length_follows_instruction": False, "c_dpo_improves_length_score": None,
                        "nll_long_context_helps": True}
    assert text.count("| incomplete") == 2 and text.count("| **no** |") == 3 and text.count("| **yes** |") == 1
    # NLL: sft minus cap500 at 500 and at the end position, the change and its interval
    lc = _json("results/gpu/nll/claim.json")["long_context"]
    assert (f"{lc['difference_at_500']:.3f} at 500, {lc['difference_at_end']:.3f} at {lc['end_position']:,}: change "
            f"{lc['change']:.3f}, interval {lc['lo']:.3f} .. {lc['hi']:.3f} (one seed each, {lc['samples']} passages)"
            ) in text and lc["seeds"] == [0] and lc["position"] == 500
    # gpu_smollm2: (a), (b), (c) as the README states them
    cap = _json("results/gpu_smollm2/sft/cap_experiment.json")["loopfree"]
    p95 = dict(zip(cap["caps"], (round(x) for x in cap["p95_effective_words"])))
    assert f"uncapped {p95[None]:,} <\ncap4000 {p95[4000]:,}" in text or \
        f"uncapped {p95[None]:,} < cap4000 {p95[4000]:,}" in text.replace("\n", " ")
    arms = _json("results/gpu_smollm2/sft/arms.json")["loopfree"]
    assert f"({round(arms['sft'])} vs {round(arms['sft_general'])}, " in text.replace("\n", " ")
    c = _json("results/gpu_smollm2/dpo/length_score_difference.json")["loopfree"]
    assert f"S_l {c['before']:.1f} -> {c['after']:.1f}, interval {c['lo']:.1f} .. {c['hi']:.1f}" in text.replace("\n", " ")
