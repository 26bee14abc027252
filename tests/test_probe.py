"""LongWrite-Ruler probe: selection, resume without duplicates, summary, and notebook 01 end to end."""

import json

import pandas as pd
import pytest

from lwlib.config import load_profile
from lwlib.data import load_ruler
from lwlib.plots import check_figure
from lwlib.probe import ProbeConfig, run_probe, select_items, summarize_probe
from lwlib.runs import read_jsonl
from nbutil import execute_notebook


def test_select_items_subsets_the_official_file():
    items = load_ruler()
    assert len(items) == 48
    assert len(select_items(items, ProbeConfig())) == 48
    sub = select_items(items, ProbeConfig(languages=["en"], lengths=[1000, 30000], templates=2))
    assert len(sub) == 4 and {i.lang for i in sub} == {"en"} and {i.length for i in sub} == {1000, 30000}
    with pytest.raises(ValueError, match="'fr'"):
        select_items(items, ProbeConfig(languages=["fr"]))


class CrashAfter:
    """Wraps a backend and dies after ``n`` outputs, like a killed job."""

    def __init__(self, backend, n):
        self.backend, self.n, self.name = backend, n, backend.name

    def generate_iter(self, prompts, params, max_new_tokens=None, desc=None):
        for k, item in enumerate(self.backend.generate_iter(prompts, params, max_new_tokens, desc)):
            if k == self.n:
                raise KeyboardInterrupt("killed")
            yield item


def test_probe_resumes_without_duplicates(tmp_path, local_backend):
    prof = load_profile("smoke", run_root=tmp_path, overrides={
        "probe.lengths": [1000, 2000, 5000], "probe.max_new_tokens": 8, "probe.samples_per_prompt": 1})
    with pytest.raises(KeyboardInterrupt):
        run_probe(prof, prof.model, "base", backend=CrashAfter(local_backend, 2))
    path = tmp_path / "smoke" / "probe" / "base" / "paper" / "generations.jsonl"  # the first decoding of smoke
    first = read_jsonl(path)
    assert len(first) == 2
    df = run_probe(prof, prof.model, "base", backend=local_backend)
    recs = read_jsonl(path)
    assert len(recs) == 3 and len({r["id"] for r in recs}) == 3
    assert recs[:2] == first  # nothing computed before the crash was redone or lost
    assert set(df["required_length"]) == {1000, 2000, 5000}
    assert all(df["tokens"] <= 8) and df["hit_limit"].any()
    s = json.loads((path.parent / "summary.json").read_text())
    assert s["n_outputs"] == 3 and (path.parent / "manifest.json").exists()


def test_summarize_probe_on_known_values():
    df = pd.DataFrame({"required_length": [1000] * 4, "words": [100, 200, 300, 400],
                       "effective_words": [100, 50, 300, 10], "hit_limit": [False, True, True, False],
                       "collapsed": [False, True, False, True]})
    s = summarize_probe(df, quantile=0.5)
    assert s["max_output_words_raw"] == 250 and s["max_output_words_effective"] == 75
    assert s["share_hit_limit"] == 0.5 and s["share_collapsed"] == 0.5 and s["largest_output_words"] == 400
    assert s["share_stopped"] == 0.5


def test_notebook_01_runs_and_writes_figure_and_metrics(tmp_path):
    out = execute_notebook("01_output_length_probe.ipynb", tmp_path,
                           overrides={"probe.lengths": [1000, 10000], "probe.max_new_tokens": 24})
    assert out.exists()
    fig = tmp_path / "figures" / "smoke" / "ruler_probe.png"
    assert fig.exists() and fig.stat().st_size > 10_000 and check_figure(fig) == []
    metrics = json.loads((tmp_path / "runs" / "smoke" / "probe" / "metrics.json").read_text())
    assert set(metrics) == {"base (paper)", "base (loopfree)"}  # every model under both decodings
    assert metrics["base (paper)"]["n_outputs"] == 2 and metrics["base (paper)"]["max_output_words_raw"] > 0


class Recorder:
    """A backend that answers every prompt with a fixed text and records the settings it was asked for."""

    def __init__(self, name, log):
        self.name, self.log = name, log

    def generate_iter(self, prompts, params, max_new_tokens=None, desc=None):
        from lwlib.backends import Generation

        self.log.append((self.name, params))
        for i, _ in enumerate(prompts):
            yield i, Generation("word " * 20, 10, 20, "stop")


def test_every_model_is_probed_under_every_decoding(tmp_path, monkeypatch):
    import lwlib.probe as probe_mod
    from lwlib.decodings import profile_decodings
    from lwlib.probe import probe_models

    prof = load_profile("smoke", run_root=tmp_path, overrides={"probe.max_new_tokens": 8})
    log = []
    monkeypatch.setattr(probe_mod, "make_backend", lambda cfg, model, *a: Recorder(model, log))
    frames = probe_models(prof, {"base": "model-a", "sft": "model-b"})
    decs = profile_decodings(prof)
    assert list(frames) == [f"{t} ({d.name})" for t in ("base", "sft") for d in decs]
    # one call per model, its prompts under every decoding in one batch (each prompt its own settings)
    n = len(frames["base (paper)"])
    assert [(m, p) for m, p in log] == [(m, [d.params(8, prof.seed) for d in decs for _ in range(n)])
                                        for m in ("model-a", "model-b")]
    for name, df in frames.items():
        tag, dec = name.split(" (")
        assert set(df["decoding"]) == {dec.rstrip(")")} and set(df["tag"]) == {tag}
        assert (tmp_path / "smoke" / "probe" / tag / dec.rstrip(")") / "generations.jsonl").exists()
    assert log[0][1][0].repetition_penalty == 1.0 and log[0][1][-1].repetition_penalty > 1.0
    log.clear()
    probe_models(prof, {"base": "model-a", "sft": "model-b"})  # all stored: no backend is built, nothing generated
    assert log == []
