"""LongBench-Write: the paper's benchmark stage (Section 4.1, Table 2), scored exactly as its official code.

This module holds the stage: the section config (:class:`BenchConfig`), item selection, predictions
(:func:`run_predictions`), judging them (:func:`run_judge`), the whole evaluation (:func:`evaluate_models`), the
tables (:func:`score_table`, :func:`paper_table`, ...), the comparison with the paper's published scores
(``lwlib/paper_scores.json``) and the figures. The scores it uses live in shared modules:
:mod:`lwlib.scoring` (length score, buckets) and :mod:`lwlib.judge` (the LLM judge: prompt, parsing, quality
score, judge config, cache, the judging loop).

The score of a model is ``S = (S_l + S_q) / 2``:

* ``S_l`` (length): per item :func:`lwlib.scoring.length_score` of required vs output words
  (``lwlib.text.count_words``), averaged over items (official ``evaluation/eval_length.py``);
* ``S_q`` (quality): an LLM judge scores each response 1-5 on six dimensions with the official prompt
  (``lwlib/prompts/judge.txt``, verbatim); each dimension maps to 0-100 by ``(mean - 1) * 25`` and
  ``S_q`` is the mean of the six (official ``evaluation/eval_quality.py``; :func:`lwlib.judge.quality_score`).
  Unparseable answers are retried up to 5 times; items still unjudged are recorded as failures and ``S_q`` is
  computed over the judged items only, with the count always reported beside it.

Beyond the official scripts: bootstrap confidence intervals, tables per required-length bucket, type
and language, repetition diagnostics (share of outputs that collapse into loops, ``S_l`` on raw and on
effective length, :mod:`lwlib.text`), a cache of judge calls keyed by (judge model, prompt, response)
(:class:`lwlib.judge.JudgeCache`), and a comparison with the paper's published scores.

Usage::

    cfg = prof.section("bench", BenchConfig)
    results = evaluate_models(prof, cfg)          # {tag: DataFrame} for every model found
    paper_table(results)                          # the paper's Table 2 layout
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .backends import Backend, BackendConfig, Generation, make_backend, samples_params
from .config import Profile
from .typed import check_sizes
from .data import WritingItem, data_file, load_longbench_write
from .decodings import Decoding, model_label, profile_decodings
from .generation import Job, generate_into
from .intervals import unit_ids
from .judge import (JUDGE_DIMENSIONS, Judged, JudgeConfig, JudgeResult, close_judge, judge_cache, judge_label,
                    judge_model_id, judge_records, judging_fingerprint, make_judge, quality_score)
from .plots import model_grid, panel_grid, pyplot, save_figure
from .runs import (JsonlStore, atomic_write_json, data_fingerprint, fingerprint_id, model_fingerprint,
                   read_fingerprint, read_records, write_manifest)
from .scoring import BUCKET_NAMES, bucket_of, length_score
from .text import count_words, repetition_report

PAPER_SCORES_PATH = Path(__file__).parent / "paper_scores.json"


# ----------------------------------------------------------------------------------------- stage


@dataclass
class BenchConfig:
    """The ``bench`` section of a profile (notebook 06).

    Fields:
        models: model tags to evaluate: ``base``, ``sft``, ``dpo`` (this run's checkpoints, skipped
            with a note when missing) or any name/path ``load_model`` accepts.
        languages: required output languages to keep (``en`` = the 60 items of longbench_write_en).
        max_items: evaluate this many items (null = all), taken evenly along the required-length order
            so every bucket is represented; deterministic.
        max_new_tokens: token budget per prediction (paper: 32768 for open models). Sampling settings come from
            the profile's ``decodings`` (:mod:`lwlib.decodings`; the paper's: temperature 0.5, as the official
            pred.py); every model is predicted under each of them.
        backend: prediction backend (lwlib.backends.BackendConfig); model empty = the tag's model.
        judge: the quality judge (:class:`lwlib.judge.JudgeConfig`).
        samples: outputs per item, model and decoding (the gpu design's 2); sample ``k >= 1`` is stored as
            ``<item id>-s<k>`` (``item_id`` and ``sample`` columns), and intervals resample items, a sample never
            without its item's others.
        n_boot: bootstrap resamples for 95% confidence intervals (0 = none).
        rep_ngram: n of the repeated-n-gram measure (lwlib.text.repetition_report).
        rep_window: window (in n-grams) of the collapse rule.
        rep_threshold: repeated share at which a window counts as collapsed.
        data_path: longbench_write.jsonl or its folder; null = lwlib.data's search order.
        en_data_path: longbench_write_en.jsonl or its folder; null = lwlib.data's search order.
        overwrite: when a tag's stored predictions or judgements were made with other settings (model,
            decoding, data, seed, judge; lwlib.runs.StaleRunError), move them aside and start anew
            instead of refusing.
    """

    models: list[str] = field(default_factory=lambda: ["base", "sft", "dpo"])
    languages: list[str] = field(default_factory=lambda: ["en", "zh"])
    max_items: int | None = None
    max_new_tokens: int = 32768
    backend: BackendConfig = field(default_factory=BackendConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    samples: int = 1
    n_boot: int = 1000
    rep_ngram: int = 5
    rep_window: int = 200
    rep_threshold: float = 0.5
    data_path: str | None = None
    en_data_path: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        check_sizes(self, "bench", 1, "max_items", "max_new_tokens", "samples", "rep_ngram", "rep_window")
        check_sizes(self, "bench", 0, "n_boot")


def select_items(items: list[WritingItem], cfg: BenchConfig) -> list[WritingItem]:
    """Keep ``cfg.languages``; then, with ``cfg.max_items``, items spread evenly along required length."""
    for lang in cfg.languages:
        if lang not in ("en", "zh"):
            raise ValueError(f"bench.languages: {lang!r} is not 'en' or 'zh'")
    out = [it for it in items if it.lang in cfg.languages]
    if not out:
        raise ValueError(f"bench: no LongBench-Write item has languages={cfg.languages}")
    if cfg.max_items is not None:
        if cfg.max_items <= 0:
            raise ValueError(f"bench.max_items must be positive or null, got {cfg.max_items}")
        if cfg.max_items < len(out):
            by_len = sorted(out, key=lambda it: (it.length, it.id))
            pos = np.linspace(0, len(by_len) - 1, cfg.max_items).round().astype(int)
            keep = {by_len[p].id for p in pos}
            out = [it for it in out if it.id in keep]
    return out


def _rep(text: str, cfg: BenchConfig):
    return repetition_report(text, cfg.rep_ngram, cfg.rep_window, cfg.rep_threshold)


def run_predictions(
    profile: Profile,
    tag: str,
    cfg: BenchConfig | None = None,
    backend: Backend | None = None,
    items: list[WritingItem] | None = None,
    decoding: Decoding | None = None,
) -> pd.DataFrame:
    """Generate a response for every selected item under ``decoding`` (default: the profile's first); resumable.
    One row per item.

    Writes ``<run>/bench/<tag>/<decoding>/predictions.jsonl`` (id, tag, model, decoding, prompt, type, lang, length,
    bucket, response, response_length (= count_words), tokens, hit_limit, finish_reason,
    effective_length, collapsed, repeated_rate) as each output arrives, and ``manifest.json``.
    ``tag`` is resolved with :func:`lwlib.models.run_model` (missing checkpoints raise FileNotFoundError).
    """
    decoding = decoding or profile_decodings(profile)[0]
    return predict_decodings(profile, tag, [decoding], cfg, backend, items)[decoding.name]


def predict_decodings(
    profile: Profile,
    tag: str,
    decodings: Sequence[Decoding],
    cfg: BenchConfig | None = None,
    backend: Backend | None = None,
    items: list[WritingItem] | None = None,
) -> dict[str, pd.DataFrame]:
    """:func:`run_predictions` under several decodings in one backend call (one batch of all their rows), a
    store per decoding; ``{decoding name: predictions}``. The backend is built only if something is missing."""
    from .models import run_model, split_seed

    cfg = cfg or profile.section("bench", BenchConfig)
    seed = profile.seed + split_seed(tag)[1]  # seed k's models (sft-s<k>, dpo-s<k>) sample with seed + k
    try:
        model = cfg.backend.model or (run_model(profile, tag) if backend is None else getattr(backend, "name", tag))
    except FileNotFoundError:  # the checkpoint is gone: an earlier sitting's complete predictions are read back
        done = predicted_before(profile, tag, cfg, decodings, items)
        if done is None:
            raise
        return done
    data = ([data_fingerprint(data_file("longbench_write.jsonl", cfg.data_path, field="bench.data_path")),
             data_fingerprint(data_file("longbench_write_en.jsonl", cfg.en_data_path, field="bench.en_data_path"))]
            if items is None else fingerprint_id({it.id: [it.prompt, it.lang, it.length] for it in items}))
    items = items if items is not None else select_items(load_longbench_write(
        cfg.data_path, cfg.en_data_path, field="bench.data_path", en_field="bench.en_data_path"), cfg)
    stores, jobs = {}, []
    for dec in decodings:
        out = bench_dir(profile, tag, dec.name)
        fingerprint = {  # what decides a record (not the selection: records are per item)
            "model": model_fingerprint(model, profile.run_dir), "max_new_tokens": cfg.max_new_tokens,
            "decoding": dec.as_dict(), "seed": seed, "data": data,
            "repetition": [cfg.rep_ngram, cfg.rep_window, cfg.rep_threshold],  # stored per record
            **(profile.numerics() if cfg.backend.kind == "local" else {}),  # a local model's device and dtype
        }
        store = stores[dec.name] = JsonlStore(out / "predictions.jsonl", key="id", fingerprint=fingerprint,
                                              overwrite=cfg.overwrite, stage="bench")
        write_manifest(out, {"profile": profile.resolved(), "bench": dataclasses.asdict(cfg), "model": model,
                             "tag": tag, "decoding": dec.as_dict(), "fingerprint": fingerprint})
        params = samples_params(dec.params(cfg.max_new_tokens, seed=seed), cfg.samples)
        jobs += [Job(sample_id(it.id, k), it.prompt, params[k], store,
                     functools.partial(_prediction_record, it=it, tag=tag, model=model, dec=dec.name, cfg=cfg, k=k))
                 for it in items for k in range(cfg.samples)]
    names = "+".join(d.name for d in decodings)
    generate_into(jobs, backend, make=lambda: make_backend(cfg.backend, model, profile.device, profile.dtype),
                  desc=f"LongBench-Write ({tag}: {names})", what=f"bench predictions ({tag}, {names})")
    ids = {sample_id(it.id, k) for it in items for k in range(cfg.samples)}
    return {d.name: add_length_scores(pd.DataFrame([r for r in stores[d.name].records() if r["id"] in ids]))
            for d in decodings}


def predicted_before(profile: Profile, tag: str, cfg: BenchConfig | None = None,
                     decodings: Sequence[Decoding] | None = None, items: list[WritingItem] | None = None,
                     ) -> dict[str, pd.DataFrame] | None:
    """The predictions of ``tag`` under every decoding (default: the profile's) when an earlier sitting made every
    selected item and sample of it (its checkpoint may be gone: a session does not keep what it trained), else
    None; read as they are, without the store's fingerprint check (which would need the checkpoint):
    ``{decoding name: predictions}``, as :func:`predict_decodings` returns them.

    Usage: ``done = predicted_before(prof, "dpo-s1")  # None until every item of every decoding is there``
    """
    cfg = cfg or profile.section("bench", BenchConfig)
    if items is None:
        items = select_items(load_longbench_write(cfg.data_path, cfg.en_data_path, field="bench.data_path",
                                                  en_field="bench.en_data_path"), cfg)
    want = {sample_id(it.id, k) for it in items for k in range(cfg.samples)}
    out = {}
    for dec in decodings or profile_decodings(profile):
        path = profile.stage_dir("bench") / tag / dec.name / "predictions.jsonl"
        recs = [r for r in read_records(path) if r["id"] in want] if path.exists() else []
        if {r["id"] for r in recs} != want:
            return None
        out[dec.name] = add_length_scores(pd.DataFrame(recs))
    return out


def bench_tags(profile: Profile, tags: Sequence[str], cfg: BenchConfig | None = None) -> list[str]:
    """The ``tags`` LongBench-Write can score: those whose model exists in this run, and those whose checkpoint is
    gone but an earlier sitting predicted in full (:func:`predicted_before`); each other one is skipped with a note.

    Usage: ``bench_tags(prof, ["base", "sft", "dpo", "dpo-s1"])``
    """
    from .models import available_tags

    return available_tags(profile, tags, "bench", done=lambda t: predicted_before(profile, t, cfg) is not None)


def sample_id(item_id: str, k: int) -> str:
    """The record id of sample ``k`` of an item: the item's id for 0 (as one-sample runs stored it), ``-s<k>`` after.

    Usage: ``sample_id("lbw-007", 1) == "lbw-007-s1"``
    """
    return item_id if k == 0 else f"{item_id}-s{k}"


def _prediction_record(g: Generation, it: WritingItem, tag: str, model: str, dec: str, cfg: BenchConfig,
                       k: int = 0) -> dict:
    rep = _rep(g.text, cfg)
    return {
        "id": sample_id(it.id, k), "item_id": it.id, "sample": k, "tag": tag, "model": model, "decoding": dec,
        "prompt": it.prompt, "type": it.type, "lang": it.lang,
        "length": it.length, "bucket": bucket_of(it.length), "response": g.text,
        "response_length": count_words(g.text), "tokens": g.completion_tokens, "hit_limit": g.hit_limit,
        "finish_reason": g.finish_reason, "effective_length": rep.effective_words,
        "collapsed": rep.collapsed, "repeated_rate": round(rep.repeated_rate, 4),
    }


def bench_dir(profile: Profile, tag: str, decoding: str) -> Path:
    """``<run>/bench/<tag>/<decoding>``, created."""
    p = profile.stage_dir("bench") / tag / decoding
    p.mkdir(parents=True, exist_ok=True)
    return p


def add_length_scores(df: pd.DataFrame) -> pd.DataFrame:
    """Add ``S_l`` (official length score) and ``S_l_eff`` (on effective length) per output; ``item_id`` and
    ``sample`` where records of a one-sample run lack them."""
    df = df.copy()
    if "item_id" not in df:
        df["item_id"] = unit_ids(df["id"]) if len(df) else []
    if "sample" not in df:
        df["sample"] = 0
    df["S_l"] = [length_score(r, a) for r, a in zip(df["length"], df["response_length"])]
    df["S_l_eff"] = [length_score(r, a) for r, a in zip(df["length"], df["effective_length"])]
    return df


def make_judge_backend(profile: Profile, cfg: BenchConfig | None = None) -> Backend | None:
    """The judge of the ``bench`` section (:func:`lwlib.judge.make_judge` of ``bench.judge``): an API model, the
    local model (labelled "local judge") or None (``kind: none``)."""
    cfg = cfg or profile.section("bench", BenchConfig)
    return make_judge(profile, cfg.judge, where="bench.judge")


def run_judge(
    profile: Profile,
    tag: str,
    judge_backend: Backend | None = None,
    cfg: BenchConfig | None = None,
    decoding: Decoding | None = None,
) -> pd.DataFrame:
    """Judge every prediction of ``tag`` under ``decoding`` (resumable; cached by judge model, prompt and response).

    Writes ``<run>/bench/<tag>/<decoding>/judgements.jsonl`` (id, judge, status ok/failed, tries, scores, S_q,
    raw answers) and uses ``<run>/bench/judge_cache.jsonl`` (:func:`lwlib.judge.judge_records`). Items whose every
    try hit a transport error are not stored (a rerun retries them) but appear with status ``error``. Returns the
    predictions with judgement columns (``judged``, ``judge_status``, ``judge_tries``, the six
    dimensions, ``S_q``; NaN where not judged).
    """
    cfg = cfg or profile.section("bench", BenchConfig)
    decoding = decoding or profile_decodings(profile)[0]
    out = bench_dir(profile, tag, decoding.name)
    pred_path = out / "predictions.jsonl"
    if not pred_path.exists():
        raise FileNotFoundError(f"{pred_path} does not exist: run run_predictions(prof, {tag!r}) first")
    preds = add_length_scores(pd.DataFrame(JsonlStore(pred_path).records()))
    if judge_backend is None and cfg.judge.kind == "none":
        return _merge_judgements(preds, {}, {}, "none")
    own = judge_backend is None
    judge_backend = judge_backend or make_judge_backend(profile, cfg)
    try:
        j = cfg.judge
        judging = judging_fingerprint(j, judge_model_id(judge_backend), profile.seed)
        pred_fp = read_fingerprint(pred_path)
        store = JsonlStore(out / "judgements.jsonl", key="id", overwrite=cfg.overwrite, stage="bench", fingerprint={
            **judging, "max_response_words": j.max_response_words,
            "predictions": fingerprint_id(pred_fp) if pred_fp is not None else None})
        cache = judge_cache(profile.stage_dir("bench") / "judge_cache.jsonl", j, profile.seed, stage="bench",
                            overwrite=cfg.overwrite)
        errors = judge_records(preds.to_dict("records"), judge_backend, j, store, _judgement_record, cache,
                               seed=profile.seed, desc=f"judge ({model_label(tag, decoding)})")
        if errors:
            print(f"[bench] judge ({tag}): {len(errors)} item(s) got only transport errors (not stored; rerun to "
                  f"retry): {next(iter(errors.values())).error}")
        return _merge_judgements(preds, {r["id"]: r for r in store.records()}, errors, judge_label(judge_backend))
    finally:
        if own:
            close_judge(judge_backend)


def _judgement_record(j: Judged) -> dict:
    res = j.result
    return {
        "id": j.record["id"], "judge_model": j.judge_model, "judge": j.label, "status": res.status,
        "tries": res.tries, "scores": res.scores, "S_q": quality_score(res.scores) if res.scores else None,
        "judge_truncated": j.truncated, "cached": j.cached, "outputs": res.outputs,
    }


def _merge_judgements(preds: pd.DataFrame, recs: dict[str, dict], errors: dict[str, JudgeResult], label: str) -> pd.DataFrame:
    df = preds.copy()
    status, tries, sq, cut = [], [], [], []
    dims: dict[str, list] = {d: [] for d in JUDGE_DIMENSIONS}
    for id_ in df["id"]:
        rec = recs.get(id_)
        if rec is None:
            status.append("error" if id_ in errors else ("not judged" if label == "none" else "missing"))
            tries.append(errors[id_].tries if id_ in errors else 0)
            sq.append(np.nan)
            cut.append(False)
            for d in JUDGE_DIMENSIONS:
                dims[d].append(np.nan)
            continue
        status.append(rec["status"])
        tries.append(rec["tries"])
        sq.append(rec["S_q"] if rec["S_q"] is not None else np.nan)
        cut.append(rec["judge_truncated"])
        for d in JUDGE_DIMENSIONS:
            dims[d].append(rec["scores"][d] if rec["scores"] else np.nan)
    df["judge"] = label
    df["judge_status"] = status
    df["judged"] = [s == "ok" for s in status]
    df["judge_tries"] = tries
    df["judge_truncated"] = cut
    for d in JUDGE_DIMENSIONS:
        df[d] = dims[d]
    df["S_q"] = sq
    return df


def evaluate_models(
    profile: Profile,
    cfg: BenchConfig | None = None,
    judge_backend: Backend | None = None,
    backends: dict[str, Backend] | None = None,
    summary_path: str | Path | None = None,
) -> dict[str, pd.DataFrame]:
    """Predict and judge every model of ``cfg.models`` that exists under every decoding of the profile;
    ``{"<tag> (<decoding>)": scored DataFrame}``.

    A missing checkpoint (``sft``/``dpo`` not trained in this run) is skipped with a printed note, unless an
    earlier sitting predicted every item of it (:func:`bench_tags`): those predictions are scored.
    One judge serves all models (built from the config unless given). ``backends`` may give a
    prediction backend per tag (tests). Writes ``summary_path`` (default ``<run>/bench/summary.json``).
    """
    cfg = cfg or profile.section("bench", BenchConfig)
    backends = backends or {}
    tags = [t for t in cfg.models if t in backends or t in bench_tags(profile, [t], cfg)]
    if not tags:
        raise RuntimeError(f"bench: none of the models {cfg.models} exists in {profile.run_dir}")
    decs = profile_decodings(profile)
    for tag in tags:  # every decoding of a model in one batch; its backend built only if something is missing
        predict_decodings(profile, tag, decs, cfg, backend=backends.get(tag))
    own = judge_backend is None and cfg.judge.kind != "none"
    judge_backend = judge_backend or make_judge_backend(profile, cfg)
    try:
        results = {model_label(tag, dec): run_judge(profile, tag, judge_backend, cfg, dec) for tag in tags for dec in decs}
    finally:
        if own and hasattr(judge_backend, "close"):
            judge_backend.close()
    atomic_write_json(summary_path or profile.stage_dir("bench") / "summary.json",
                      summarize(results, cfg.n_boot, profile.seed))
    return results


# ----------------------------------------------------------------------------------------- tables


def _boot_ci(sl: np.ndarray, sq: np.ndarray, n_boot: int, seed: int) -> dict[str, tuple[float, float]]:
    """Percentile 95% intervals of S_l, S_q (over judged items of each resample) and S, resampling items."""
    if n_boot <= 0 or len(sl) == 0:
        return {}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(sl), size=(n_boot, len(sl)))
    b_sl = sl[idx].mean(axis=1)
    q = sq[idx]
    with np.errstate(invalid="ignore", divide="ignore"):
        cnt = (~np.isnan(q)).sum(axis=1)
        b_sq = np.where(cnt > 0, np.nansum(q, axis=1) / np.maximum(cnt, 1), np.nan)
    b_s = (b_sl + b_sq) / 2
    out = {}
    for name, b in (("S_l", b_sl), ("S_q", b_sq), ("S", b_s)):
        b = b[~np.isnan(b)]
        if len(b):
            out[name] = (float(np.percentile(b, 2.5)), float(np.percentile(b, 97.5)))
    return out


def _scores(g: pd.DataFrame, n_boot: int, seed: int) -> dict[str, Any]:
    sl = g["S_l"].to_numpy(float)
    sq = g["S_q"].to_numpy(float) if "S_q" in g else np.full(len(g), np.nan)
    judged = int((~np.isnan(sq)).sum())
    s_l = float(sl.mean()) if len(sl) else np.nan
    s_q = float(np.nanmean(sq)) if judged else np.nan
    status = g["judge_status"] if "judge_status" in g else pd.Series(["not judged"] * len(g))
    row = {
        "n": len(g), "judged": judged, "judge_failed": int((status == "failed").sum()),
        "judge_errors": int((status == "error").sum()),
        "S": (s_l + s_q) / 2 if judged else np.nan, "S_l": s_l, "S_q": s_q,
        "S_l_eff": float(g["S_l_eff"].mean()) if len(g) else np.nan,
        "collapsed": float(g["collapsed"].mean()) if len(g) else np.nan,
        "hit_limit": float(g["hit_limit"].mean()) if len(g) else np.nan,
    }
    row["items"] = int(g["item_id"].nunique()) if "item_id" in g else len(g)
    if row["items"] < len(g):  # several samples per item: the intervals resample items
        per_item = pd.DataFrame({"item": g["item_id"].to_numpy(), "sl": sl, "sq": sq}).groupby("item", sort=False)
        sl, sq = per_item["sl"].mean().to_numpy(float), per_item["sq"].mean().to_numpy(float)  # NaN-skipping means
    for name, (lo, hi) in _boot_ci(sl, sq, n_boot, seed).items():
        row[f"{name}_lo"], row[f"{name}_hi"] = lo, hi
    return row


def score_table(df: pd.DataFrame, by: str | None = "bucket", n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """S, S_l, S_q (with bootstrap 95% CIs ``*_lo``/``*_hi``) overall and per ``by`` group
    (``bucket``, ``type``, ``lang`` or None), with item, judged and failure counts, ``S_l_eff`` (on
    effective length) and the shares of collapsed and token-limited outputs.

    S_q and S are over judged items only (``judged`` says how many); NaN when none was judged.
    """
    if df.empty:
        raise ValueError("score_table: no items")
    rows = [{"group": "overall", **_scores(df, n_boot, seed)}]
    if by is not None:
        keys = list(BUCKET_NAMES) if by == "bucket" else sorted(df[by].unique())
        for k in keys:
            g = df[df[by] == k]
            if len(g):
                rows.append({"group": k, **_scores(g, n_boot, seed)})
    return pd.DataFrame(rows).set_index("group")


def paper_table(results: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The paper's Table 2 layout: per model, overall S/S_l/S_q and S_l/S_q per length bucket,
    plus how many items were judged (S_q is over judged items only)."""
    rows = {}
    for tag, df in results.items():
        t = score_table(df, "bucket", n_boot=0)
        row = {("Overall", "S"): t.loc["overall", "S"], ("Overall", "S_l"): t.loc["overall", "S_l"],
               ("Overall", "S_q"): t.loc["overall", "S_q"]}
        for b in BUCKET_NAMES:
            row[(b, "S_l")] = t.loc[b, "S_l"] if b in t.index else np.nan
            row[(b, "S_q")] = t.loc[b, "S_q"] if b in t.index else np.nan
        row[("Items", "n")] = int(t.loc["overall", "n"])
        row[("Items", "judged")] = int(t.loc["overall", "judged"])
        rows[tag] = row
    out = pd.DataFrame.from_dict(rows, orient="index")
    out.columns = pd.MultiIndex.from_tuples(out.columns)
    out.index.name = "model"
    return out.round(1)


def group_table(results: dict[str, pd.DataFrame], by: str, n_boot: int = 0) -> pd.DataFrame:
    """:func:`score_table` by ``by`` for every model, stacked (index: model, group)."""
    return pd.concat({tag: score_table(df, by, n_boot) for tag, df in results.items()}, names=["model"]).round(2)


def judge_summary(results: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per model: the judge, items, judged, failed after all tries, transport errors, tries used,
    responses cut for the judge. Reported beside every S_q."""
    rows = []
    for tag, df in results.items():
        st = df["judge_status"] if "judge_status" in df else pd.Series(["not judged"] * len(df))
        rows.append({
            "model": tag, "judge": df["judge"].iloc[0] if "judge" in df else "none", "items": len(df),
            "judged": int((st == "ok").sum()), "failed (unparseable after all tries)": int((st == "failed").sum()),
            "transport errors": int((st == "error").sum()),
            "mean tries": float(df["judge_tries"].mean()) if "judge_tries" in df else 0.0,
            "responses cut for judge": int(df["judge_truncated"].sum()) if "judge_truncated" in df else 0,
        })
    return pd.DataFrame(rows).set_index("model")


def repetition_table(results: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Per model and bucket: share of outputs collapsed into loops, share at the token limit, mean raw
    and effective words, and S_l on raw vs effective length (a loop earns raw length, not effective)."""
    rows = []
    for tag, df in results.items():
        for b in ("overall", *BUCKET_NAMES):
            g = df if b == "overall" else df[df["bucket"] == b]
            if not len(g):
                continue
            rows.append({
                "model": tag, "bucket": b, "n": len(g), "collapsed": g["collapsed"].mean(),
                "hit_limit": g["hit_limit"].mean(), "mean words": g["response_length"].mean(),
                "mean effective words": g["effective_length"].mean(), "S_l (raw)": g["S_l"].mean(),
                "S_l (effective)": g["S_l_eff"].mean(),
            })
    return pd.DataFrame(rows).set_index(["model", "bucket"]).round(2)


def load_paper_scores(path: str | Path = PAPER_SCORES_PATH) -> dict[str, Any]:
    """The paper's published LongBench-Write scores (``lwlib/paper_scores.json``): ``{"source", "scores": [...]}``;
    a row's ``S``/``S_l``/``S_q`` may be null (not found), and ``quoted_in`` names where a quoted number was read."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    for i, row in enumerate(data.get("scores", [])):
        for k in ("model", "S", "S_l", "S_q"):
            if k not in row:
                raise ValueError(f"{path}: scores[{i}] has no field {k!r}")
    return data


def _num(x: Any) -> float:
    return np.nan if x is None else float(x)


def paper_comparison(results: dict[str, pd.DataFrame], profile_name: str,
                     path: str | Path = PAPER_SCORES_PATH) -> pd.DataFrame:
    """This run's models beside the paper's published scores, each row labelled with its source.

    Rows read from a quoting source (``quoted_in``) are labelled "paper, as quoted". When
    ``paper_scores.json`` holds no scores, only this run's rows are returned and a message says where to
    fill them in.
    """
    rows = []
    for tag, df in results.items():
        t = score_table(df, None, n_boot=0).loc["overall"]
        rows.append({"source": f"this run (profile {profile_name}, judge: {df['judge'].iloc[0]})", "model": tag,
                     "S": t["S"], "S_l": t["S_l"], "S_q": t["S_q"], "items": int(t["n"]), "judged": int(t["judged"])})
    data = load_paper_scores(path)
    if not data.get("scores"):
        print(f"[bench] no published scores in {path}: {data.get('note', '')}")
    for row in data.get("scores", []):
        label = "paper, as quoted (lwlib/paper_scores.json)" if row.get("quoted_in") else f"paper ({data['source']})"
        rows.append({"source": label, "model": row["model"], "S": _num(row["S"]),
                     "S_l": _num(row["S_l"]), "S_q": _num(row["S_q"]), "items": 120, "judged": np.nan})
    return pd.DataFrame(rows).set_index(["source", "model"]).round(1)


def summarize(results: dict[str, pd.DataFrame], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """JSON-ready summary: per model, score tables by bucket, type and language, and judge counts."""
    def tab(df, by):
        t = score_table(df, by, n_boot, seed)
        return {str(k): {c: (None if pd.isna(v) else float(v)) for c, v in row.items()} for k, row in t.iterrows()}

    js = judge_summary(results)
    return {tag: {"judge": {k: (v if isinstance(v, str) else float(v)) for k, v in js.loc[tag].items()},
                  "by_bucket": tab(df, "bucket"), "by_type": tab(df, "type"), "by_lang": tab(df, "lang")}
            for tag, df in results.items()}


# ----------------------------------------------------------------------------------------- figures


def plot_length_scatter(results: dict[str, pd.DataFrame], path: str | Path, title: str, lim: tuple[float, float] = (50, 25000)) -> Path:
    """The paper's scatter (official eval_length.py): output vs required words, log-log, y = x, one panel per
    model in a grid (a row per decoding, a column per model where the labels read ``"<model> (<decoding>)"``; else
    rows of three). Outputs below the axis minimum are drawn on it as open markers, counted in the panel."""
    grid = model_grid(list(results))
    fig, axes = panel_grid(len(grid.labels), ncols=grid.ncols, panel=(3.3, 3.0), extra=(0.6, 1.4), sharex=True, sharey=True)
    langs = sorted({lang for df in results.values() for lang in df["lang"].unique()})
    n_lang = {lang: sorted({int((df["lang"] == lang).sum()) for df in results.values()}) for lang in langs}
    handles: dict[str, Any] = {}
    for ax, label in zip(axes, grid.labels):
        df = results[label]
        low_note = []
        for lang in langs:
            k = langs.index(lang)
            g = df[df["lang"] == lang]
            y = g["response_length"].to_numpy(float)
            low = y < lim[0]
            n = n_lang[lang]
            h = ax.scatter(g["length"][~low], y[~low], s=36, alpha=0.45, color=f"C{k}",
                           label=f"{lang} (n={n[0]})" if len(n) == 1 else lang)
            handles.setdefault(h.get_label(), h)
            if low.any():
                h = ax.scatter(g["length"][low], np.full(low.sum(), lim[0]), s=36, facecolors="none",
                               edgecolors=f"C{k}", label=f"{lang}: output < {lim[0]:.0f} words (drawn at {lim[0]:.0f})")
                handles.setdefault(h.get_label(), h)
                low_note.append(f"{lang} {int(low.sum())}")
        (ref,) = ax.plot(lim, lim, "k--", lw=1, label="y = x (required length)")
        handles.setdefault(ref.get_label(), ref)
        if low_note:
            ax.text(0.97, 0.03, f"< {lim[0]:.0f} words: " + ", ".join(low_note), transform=ax.transAxes,
                    ha="right", va="bottom", fontsize=8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(*lim)
        ax.set_ylim(lim[0] * 0.9, lim[1])
        ax.set_title(label, fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
    for i, ax in enumerate(axes):
        if i % grid.ncols == 0:
            ax.set_ylabel("Output length (words)")
        if i >= len(axes) - grid.ncols:
            ax.set_xlabel("Required length (words)")
            ax.xaxis.set_tick_params(labelbottom=True)
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 3), fontsize=8,
               bbox_to_anchor=(0.5, 0.0), frameon=False)
    fig.suptitle(title, fontsize=9)
    rows = -(-len(handles) // 3)
    fig.tight_layout(rect=(0, (0.18 * rows + 0.1) / fig.get_figheight(), 1, 1))
    return save_figure(fig, path)


def plot_bucket_bars(results: dict[str, pd.DataFrame], path: str | Path, title: str) -> Path:
    """The paper's Table 2 buckets as bars: S_l (top) and S_q (bottom) per required-length bucket, a bar per model,
    the value on each S_l bar and judged/items on each S_q bar; a panel without any judged item says so."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 1, figsize=(8.6, 6.6), sharex=True)
    x = np.arange(len(BUCKET_NAMES))
    n_models = max(len(results), 1)
    w = 0.8 / n_models
    vertical = n_models > 3
    tables = {tag: score_table(df, "bucket", n_boot=0).reindex(list(BUCKET_NAMES)) for tag, df in results.items()}
    judged_any = any((t["judged"].fillna(0) > 0).any() for t in tables.values())
    for k, (tag, t) in enumerate(tables.items()):
        style = {"color": f"C{k % 10}", "hatch": ("", "//", "..", "xx")[k // 10 % 4]}
        for ax, col in zip(axes, ("S_l", "S_q")):
            if col == "S_q" and not judged_any:
                continue
            vals = t[col].to_numpy(float)
            xs = x + (k - (n_models - 1) / 2) * w
            ax.bar(xs, np.nan_to_num(vals), w, label=tag, **style)
            for xi, v, j, nn in zip(xs, vals, t["judged"], t["n"]):
                if pd.isna(nn):
                    continue
                text = f"{v:.0f}" if col == "S_l" and not pd.isna(v) else f"{int(j)}/{int(nn)}" if col == "S_q" else ""
                ax.text(xi, (0 if pd.isna(v) else v) + 1.5, text, ha="center", va="bottom", fontsize=8,
                        rotation=90 if vertical else 0)
    counts = []
    for b in BUCKET_NAMES:
        ns = sorted({int(t.at[b, "n"]) for t in tables.values() if not pd.isna(t.at[b, "n"])})
        counts.append(f"{b}\n" + (f"{ns[0]} item{'s' * (ns[0] != 1)}" if len(ns) == 1 else f"{ns[0]}-{ns[-1]} items"
                                  if ns else "no item"))
    axes[0].set_title("S_l, length score (label: value)", fontsize=10)
    axes[1].set_title("S_q, quality score over judged items (label: judged/items)", fontsize=10)
    if not judged_any:
        axes[1].text(0.5, 0.5, "no item judged (judge none, or every answer unusable)", transform=axes[1].transAxes,
                     ha="center", va="center", fontsize=10, color="0.35")
    for ax in axes:
        ax.set_ylim(0, 118 if vertical else 108)
        ax.set_ylabel("score (0-100)")
        ax.grid(True, axis="y", alpha=0.3)
    axes[1].set_xticks(x, counts)
    axes[1].set_xlabel("Required length (words): the paper's Table 2 buckets")
    axes[0].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def length_score_difference(before: pd.DataFrame | dict[int, pd.DataFrame], after: pd.DataFrame | dict[int, pd.DataFrame],
                            by: str | None = "bucket", n_boot: int = 1000, seed: int = 0,
                            column: str = "S_l") -> pd.DataFrame:
    """``after - before`` of the mean ``column`` (S_l) on the same items, overall and per ``by`` group, with a paired
    bootstrap 95% interval and the share of resamples above 0. ``before``/``after``: one run's predictions, or
    ``{seed index: predictions}`` (seed k's SFT and its DPO model). Outputs pair by record id (sample k of an item
    with sample k), a difference is averaged over an item's samples, and the bootstrap resamples seeds, then items
    within each seed (both models together); a seed missing on either side is left out, an item must be in every
    seed. Columns: n (items), seeds, before, after, difference, lo, hi, share_above_0 (and ``d_s<k>``, seed k's
    difference, with several seeds).

    Usage: ``length_score_difference(results["sft (paper)"], results["dpo (paper)"])``
    """
    before = before if isinstance(before, dict) else {0: before}
    after = after if isinstance(after, dict) else {0: after}
    seeds = sorted(set(before) & set(after))
    per_seed = {}
    for k in seeds:
        b, a = before[k], after[k]
        if "item_id" not in b:  # a one-sample run's records
            b = b.assign(item_id=unit_ids(b["id"]))
        m = b[["id", "item_id", column, "bucket", "type", "lang"]].merge(a[["id", column]], on="id",
                                                                          suffixes=("_before", "_after"))
        per_seed[k] = m.groupby("item_id", sort=True).agg(
            before=(f"{column}_before", "mean"), after=(f"{column}_after", "mean"), bucket=("bucket", "first"),
            type=("type", "first"), lang=("lang", "first"))
    items = sorted(set.intersection(*(set(t.index) for t in per_seed.values()))) if per_seed else []
    if not items:
        raise ValueError("length_score_difference: the two results share no item"
                         + (f" (seeds {seeds})" if len(seeds) > 1 else ""))
    tabs = [per_seed[k].loc[items] for k in seeds]
    rng = np.random.default_rng(seed)
    info = tabs[0]
    groups = [("overall", np.ones(len(items), bool))]
    if by is not None:
        keys = list(BUCKET_NAMES) if by == "bucket" else sorted(info[by].unique())
        groups += [(k, (info[by] == k).to_numpy()) for k in keys if (info[by] == k).any()]
    rows = []
    for name, mask in groups:
        bef = np.stack([t["before"].to_numpy(float)[mask] for t in tabs])  # [seeds, items]
        aft = np.stack([t["after"].to_numpy(float)[mask] for t in tabs])
        d = aft - bef
        row = {"group": name, "n": int(mask.sum()), "seeds": len(seeds), "before": float(bef.mean()),
               "after": float(aft.mean()), "difference": float(d.mean())}
        if len(seeds) > 1:
            row.update({f"d_s{k}": float(d[i].mean()) for i, k in enumerate(seeds)})
        if n_boot > 0:
            n_s, n_i = d.shape
            s_idx = rng.integers(0, n_s, size=(n_boot, n_s)) if n_s > 1 else np.zeros((n_boot, 1), int)
            i_idx = rng.integers(0, n_i, size=(n_boot, n_s, n_i))
            b = d[s_idx[:, :, None], i_idx].mean(axis=(1, 2))
            row.update(lo=float(np.percentile(b, 2.5)), hi=float(np.percentile(b, 97.5)),
                       share_above_0=float((b > 0).mean()))
        rows.append(row)
    return pd.DataFrame(rows).set_index("group")
