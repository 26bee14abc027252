"""Every figure the stages draw is readable at notebook width (lwlib.plots.check_figure): aspect ratio, smallest
font once scaled to notebook width, legend entries that can be told apart; drawn here from small synthetic inputs
shaped like the stages' outputs (the notebook tests check the figures of real smoke runs the same way)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lwlib import bench
from lwlib.agentwrite import plot_length_histogram, plot_planned_vs_actual
from lwlib.dpo import plot_dpo_training
from lwlib.nll import plot_nll
from lwlib.plots import check_figure, check_figures, main, model_grid, pyplot, save_figure
from lwlib.probe import plot_ruler
from lwlib.scoring import bucket_of, length_score
from lwlib.sft import plot_loss

MODELS = ("base", "sft", "dpo")
DECODINGS = ("paper", "loopfree")


def _ruler_frame(model: str, dec: str, k: int) -> pd.DataFrame:
    rows = []
    for req in (1000, 2000, 5000, 10000, 20000, 30000):
        for s in range(2):
            words = 40 + 300 * k + 17 * s + (2000 if dec == "paper" else 0)
            rows.append({"decoding": dec, "required_length": req, "words": words, "effective_words": words // 3})
    return pd.DataFrame(rows)


def _bench_frame(seed: int, judged: bool) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for i, req in enumerate(np.geomspace(100, 20000, 24).astype(int)):
        out = int(rng.integers(0, 6000))
        rows.append({"id": f"i{i}", "lang": ("en", "zh")[i % 2], "length": int(req), "response_length": out,
                     "bucket": bucket_of(req), "S_l": length_score(req, out), "S_l_eff": length_score(req, out // 2),
                     "S_q": float(rng.uniform(20, 90)) if judged and i % 3 else np.nan,
                     "judge_status": "ok" if judged and i % 3 else "failed", "collapsed": False, "hit_limit": False})
    return pd.DataFrame(rows)


def _nll_curve(offset: float, n: int = 3000) -> pd.DataFrame:
    pos = np.arange(1, n + 1)
    return pd.DataFrame({"position": pos, "cum_avg_nll": 4 + offset - 0.3 * np.log10(pos),
                         "samples": np.maximum(1, 8 - pos // 500)})


def _figures(tmp_path):
    """(name, path) of one figure per plotting function, drawn like the stages draw them."""
    ruler = {f"{m} ({d})": _ruler_frame(m, d, k) for k, m in enumerate(MODELS) for d in DECODINGS}
    bench_res = {f"{m} ({d})": _bench_frame(k, judged=True) for k, m in enumerate(MODELS) for d in DECODINGS}
    log = pd.DataFrame({"step": range(1, 9), "loss": np.linspace(3, 2, 8), "reward_margin": np.linspace(0, 2, 8),
                        "reward_accuracy": np.linspace(0.5, 1, 8)})
    items = [{"split": "train", "words": 300 * i, "steps": [{"target_words": 400, "actual_words": 300 + 20 * i},
                                                          {"target_words": None, "actual_words": 100}]}
             for i in range(1, 8)]
    title = "A figure of a small-model run\nprofile smoke: small-model run (smollm2-135m-instruct), not the paper's numbers"
    yield "ruler, 3 models x 2 decodings", plot_ruler(ruler, tmp_path / "ruler.png", title)
    yield "ruler, 1 decoding", plot_ruler({"base (paper)": ruler["base (paper)"]}, tmp_path / "ruler1.png", title)
    yield "nll, dpo on sft", plot_nll({"base": _nll_curve(0.8), "sft": _nll_curve(0), "dpo": _nll_curve(0.0004)},
                                      tmp_path / "nll.png", title)
    yield "scatter, 6 panels", bench.plot_length_scatter(bench_res, tmp_path / "scatter.png", title)
    yield "scatter, 1 panel", bench.plot_length_scatter({"base": bench_res["base (paper)"]}, tmp_path / "s1.png", title)
    yield "buckets, judged", bench.plot_bucket_bars(bench_res, tmp_path / "buckets.png", title)
    yield "buckets, not judged", bench.plot_bucket_bars({k: _bench_frame(1, judged=False) for k in list(bench_res)[:2]},
                                                        tmp_path / "buckets0.png", title)
    yield "sft loss", plot_loss({"sft": log, "sft_general": log.assign(loss=log["loss"] / 3)}, tmp_path / "loss.png",
                                title)
    yield "dpo training", plot_dpo_training(log, tmp_path / "dpo.png", title)
    yield "agentwrite histogram", plot_length_histogram(items, tmp_path / "hist.png", title)
    yield "planned vs actual", plot_planned_vs_actual(items, tmp_path / "planned.png", title)


def test_every_stage_figure_is_readable_at_notebook_width(tmp_path):
    problems = {name: check_figure(path) for name, path in _figures(tmp_path)}
    assert {k: v for k, v in problems.items() if v} == {}
    assert check_figures(tmp_path) == {} and main(["check", str(tmp_path)]) == 0


def test_the_check_names_wide_figures_small_text_and_legend_entries_drawn_alike(tmp_path):
    plt = pyplot()
    fig, axes = plt.subplots(1, 6, figsize=(27, 5))  # the old LongBench-Write scatter: six panels in a row
    for ax in axes:
        ax.plot([1, 2], [1, 2], "o-", color="C0", label="sft")
        ax.plot([1, 2], [1, 2.001], "o-", color="C0", label="dpo")  # drawn exactly like sft
        ax.legend(fontsize=7)
    problems = " | ".join(check_figure(save_figure(fig, tmp_path / "bad.png")))
    assert "width/height" in problems and "smallest text 7 pt" in problems
    assert "legend entries drawn alike: 'dpo', 'sft'" in problems
    assert main(["check", str(tmp_path / "bad.png")]) == 1
    fig, ax = plt.subplots()
    ax.bar([0], [1], color="C0", label="a")
    ax.bar([1], [1], color="C0", hatch="//", label="b")  # a hatch tells them apart
    ax.legend()
    assert check_figure(save_figure(fig, tmp_path / "ok.png")) == []
    fig, ax = plt.subplots()
    fig.savefig(tmp_path / "plain.png")  # not through save_figure: nothing to read the fonts from
    assert check_figure(tmp_path / "plain.png") == ["no readability record (not written by lwlib.plots.save_figure)"]


@pytest.mark.parametrize("labels, ncols, first_row", [
    (["base (paper)", "base (loopfree)", "sft (paper)", "sft (loopfree)"], 2, ["base (paper)", "sft (paper)"]),
    (["a", "b", "c", "d"], 3, ["a", "b", "c"]),
    (["base (paper)", "sft (paper)"], 2, ["base (paper)", "sft (paper)"]),
])
def test_model_grid_puts_a_decoding_in_each_row(labels, ncols, first_row):
    g = model_grid(labels)
    assert g.ncols == ncols and g.labels[:ncols] == first_row and sorted(g.labels) == sorted(labels)
