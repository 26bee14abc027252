"""LongWrite-Ruler: probe a model's maximum output length (the paper's Section 2, Figure 2).

Each of the 48 official prompts asks for a fixed length ("Write a 10000-word ...", N in 1k..30k,
4 English and 4 Chinese templates). The probe generates for each prompt (several samples where the
profile says), records words (:func:`lwlib.text.count_words`), tokens, whether the token limit was hit,
and the repetition diagnostics of :mod:`lwlib.text`.

Maximum output length is reported twice, because small models run on to the token limit in loops:
  * raw: the 95th percentile of output words over all the model's outputs;
  * effective: the 95th percentile of *effective* words (words before the text collapses into
    repetition, :func:`lwlib.text.repetition_report`).

Every probe runs under each of the profile's named decodings (:mod:`lwlib.decodings`: the paper's and, in the
small-model profiles, a loop-free one), identically for every model; records go to
``probe/<tag>/<decoding>/generations.jsonl`` and tables name the decoding (``"sft (loopfree)"``).

Usage::

    df = run_probe(prof, model="smollm2-135m-instruct", tag="base", decoding=PAPER)
    summarize_probe(df)["max_output_words_effective"]
    frames = probe_models(prof, {"base": prof.model})        # {"base (paper)": df, "base (loopfree)": df}
    plot_ruler(frames, prof.figures_dir() / "ruler.png", title="LongWrite-Ruler")
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .backends import Backend, BackendConfig, Generation, make_backend, samples_params
from .config import Profile
from .typed import check_sizes
from .data import WritingItem, data_file, load_ruler
from .decodings import Decoding, model_label, profile_decodings
from .generation import Job, generate_into
from .models import split_seed
from .plots import pyplot, save_figure
from .runs import (JsonlStore, atomic_write_json, data_fingerprint, model_fingerprint, read_records,
                   write_manifest)
from .text import repetition_report


@dataclass
class ProbeConfig:
    """The ``probe`` section of a profile.

    Fields:
        languages: which of the ruler's languages to use (``en``, ``zh``).
        lengths: required lengths to keep (subset of 1000, 2000, 5000, 10000, 20000, 30000).
        templates: templates per language to keep (1-4), in file order.
        samples_per_prompt: outputs sampled per prompt.
        max_new_tokens: token budget per output (paper: 32768; the bundled model's context is 8192).
            Sampling settings come from the profile's ``decodings`` (:mod:`lwlib.decodings`).
        quantile: the quantile of output words reported as "maximum output length".
        rep_ngram: n of the repeated-n-gram measure (lwlib.text).
        rep_window: window (in n-grams) of the collapse rule.
        rep_threshold: repeated share at which a window counts as collapsed.
        data_path: the ruler file or its folder; null = lwlib.data's search order.
        backend: generation backend (lwlib.backends.BackendConfig).
        overwrite: when the stored outputs of a tag were made with other settings (model, decoding, data,
            seed, repetition rule; lwlib.runs.StaleRunError), move them aside and start anew instead of
            refusing.
    """

    languages: list[str] = field(default_factory=lambda: ["en", "zh"])
    lengths: list[int] = field(default_factory=lambda: [1000, 2000, 5000, 10000, 20000, 30000])
    templates: int = 4
    samples_per_prompt: int = 1
    max_new_tokens: int = 32768
    quantile: float = 0.95
    rep_ngram: int = 5
    rep_window: int = 200
    rep_threshold: float = 0.5
    data_path: str | None = None
    backend: BackendConfig = field(default_factory=BackendConfig)
    overwrite: bool = False

    def __post_init__(self) -> None:
        check_sizes(self, "probe", 1, "lengths", "templates", "samples_per_prompt", "max_new_tokens", "rep_ngram",
                    "rep_window")


def _template_key(prompt: str) -> str:
    return re.sub(r"\d+", "N", prompt)


def select_items(items: list[WritingItem], cfg: ProbeConfig) -> list[WritingItem]:
    """Keep the configured languages, lengths and the first ``cfg.templates`` templates per language."""
    for lang in cfg.languages:
        if lang not in ("en", "zh"):
            raise ValueError(f"probe.languages: {lang!r} is not 'en' or 'zh'")
    keep: dict[str, list[str]] = {}
    for it in items:
        ks = keep.setdefault(it.lang, [])
        k = _template_key(it.prompt)
        if k not in ks:
            ks.append(k)
    out = [
        it for it in items
        if it.lang in cfg.languages and it.length in cfg.lengths and _template_key(it.prompt) in keep[it.lang][: cfg.templates]
    ]
    if not out:
        raise ValueError(f"probe: no ruler prompt matches languages={cfg.languages} lengths={cfg.lengths}")
    return out


def run_probe(
    profile: Profile,
    model: str,
    tag: str,
    cfg: ProbeConfig | None = None,
    backend: Backend | None = None,
    decoding: Decoding | None = None,
) -> pd.DataFrame:
    """Generate for every selected ruler prompt and sample under ``decoding`` (default: the profile's first);
    resumable. Returns one row per output.

    Writes ``<run>/probe/<tag>/<decoding>/generations.jsonl`` (a record per output, as produced),
    ``summary.json`` and ``manifest.json``. Stored outputs made with other settings raise
    ``lwlib.runs.StaleRunError`` (``cfg.overwrite`` moves them aside); the selection may change freely.
    """
    decoding = decoding or profile_decodings(profile)[0]
    return probe_decodings(profile, model, tag, [decoding], cfg, backend)[decoding.name]


def probe_decodings(
    profile: Profile,
    model: str,
    tag: str,
    decodings: Sequence[Decoding],
    cfg: ProbeConfig | None = None,
    backend: Backend | None = None,
) -> dict[str, pd.DataFrame]:
    """:func:`run_probe` under several decodings at once: one backend call (the slots engine decodes the rows
    of every decoding in one batch), a store per decoding. ``{decoding name: records}``; the backend is built
    only if something is missing (and released after)."""
    cfg = cfg or profile.section("probe", ProbeConfig)
    items = select_items(load_ruler(cfg.data_path, field="probe.data_path"), cfg)
    stores, jobs = {}, []
    for dec in decodings:
        out = probe_dir(profile, tag, dec.name)
        fingerprint = {  # what decides a record (not the selection: records are per item)
            "model": model_fingerprint(model if backend is not None else cfg.backend.model or model, profile.run_dir),
            "max_new_tokens": cfg.max_new_tokens, "decoding": dec.as_dict(), "seed": profile.seed + split_seed(tag)[1],
            "data": data_fingerprint(data_file("longwrite_ruler.jsonl", cfg.data_path, field="probe.data_path")),
            "repetition": [cfg.rep_ngram, cfg.rep_window, cfg.rep_threshold],  # stored per record
            **(profile.numerics() if cfg.backend.kind == "local" else {}),  # a local model's device and dtype
        }
        store = stores[dec.name] = JsonlStore(out / "generations.jsonl", key="id", fingerprint=fingerprint,
                                              overwrite=cfg.overwrite, stage="probe")
        write_manifest(out, {"profile": profile.resolved(), "probe": dataclasses.asdict(cfg), "model": model,
                             "tag": tag, "decoding": dec.as_dict(), "fingerprint": fingerprint})
        params = samples_params(dec.params(cfg.max_new_tokens, seed=profile.seed + split_seed(tag)[1]),  # seed k's
                                cfg.samples_per_prompt)                                               # models: k
        jobs += [Job(f"{it.id}-s{s}", it.prompt, params[s], store,
                     functools.partial(_probe_record, it=it, s=s, model=model, tag=tag, dec=dec.name, cfg=cfg))
                 for it in items for s in range(cfg.samples_per_prompt)]
    names = "+".join(d.name for d in decodings)
    generate_into(jobs, backend, make=lambda: make_backend(cfg.backend, model, profile.device, profile.dtype),
                  desc=f"ruler probe ({tag}: {names})", what=f"probe ({tag}, {names})")
    want = {f"{it.id}-s{s}" for it in items for s in range(cfg.samples_per_prompt)}
    frames = {}
    for dec in decodings:
        df = frames[dec.name] = pd.DataFrame([r for r in stores[dec.name].records() if r["id"] in want])
        atomic_write_json(probe_dir(profile, tag, dec.name) / "summary.json", summarize_probe(df, cfg.quantile))
    return frames


def _probe_record(g: Generation, it: WritingItem, s: int, model: str, tag: str, dec: str, cfg: ProbeConfig) -> dict:
    rep = repetition_report(g.text, cfg.rep_ngram, cfg.rep_window, cfg.rep_threshold)
    return {
        "id": f"{it.id}-s{s}", "model": model, "tag": tag, "decoding": dec, "prompt": it.prompt,
        "type": it.type, "lang": it.lang, "required_length": it.length, "sample": s, "response": g.text,
        "words": rep.words, "tokens": g.completion_tokens, "hit_limit": g.hit_limit,
        "finish_reason": g.finish_reason, "effective_words": rep.effective_words,
        "collapsed": rep.collapsed, "repeated_rate": round(rep.repeated_rate, 4),
    }


def probe_models(profile: Profile, models: dict[str, str], cfg: ProbeConfig | None = None) -> dict[str, pd.DataFrame]:
    """:func:`probe_decodings` for every ``{tag: model}`` under every decoding of the profile, one backend
    (and one batch of all decodings) per model.

    Returns ``{"<tag> (<decoding>)": records}``, models in the given order, decodings in profile order."""
    cfg = cfg or profile.section("probe", ProbeConfig)
    decs = profile_decodings(profile)
    frames = {}
    for tag, model in models.items():
        got = probe_decodings(profile, model, tag, decs, cfg)
        frames.update({model_label(tag, dec): got[dec.name] for dec in decs})
    return frames


def probe_dir(profile: Profile, tag: str, decoding: str) -> Path:
    """``<run>/probe/<tag>/<decoding>``, created."""
    p = profile.stage_dir("probe") / tag / decoding
    p.mkdir(parents=True, exist_ok=True)
    return p


def load_probe(profile: Profile, tag: str, decoding: str) -> pd.DataFrame:
    """Read a finished probe's records (``FileNotFoundError`` names the missing file)."""
    path = profile.run_dir / "probe" / tag / decoding / "generations.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run the probe for {tag!r} under {decoding!r} first (notebook 01)")
    return pd.DataFrame(read_records(path))


def probed_before(profile: Profile, tag: str, cfg: ProbeConfig | None = None) -> dict[str, pd.DataFrame] | None:
    """The records of ``tag`` under every decoding of the profile when an earlier sitting probed every selected prompt
    and sample of it (its checkpoint may be gone: a session does not keep what it trained), else None. Read as they
    are, without the store's fingerprint check (which would need the checkpoint): ``{"<tag> (<decoding>)": records}``.

    Usage: ``frames = probed_before(prof, "cap500") or probe_models(prof, {"cap500": folder})``
    """
    cfg = cfg or profile.section("probe", ProbeConfig)
    want = {f"{it.id}-s{s}" for it in select_items(load_ruler(cfg.data_path), cfg) for s in range(cfg.samples_per_prompt)}
    out = {}
    for dec in profile_decodings(profile):
        try:
            df = load_probe(profile, tag, dec.name)
        except FileNotFoundError:
            return None
        if df.empty or not want <= set(df["id"]):
            return None
        out[model_label(tag, dec)] = df[df["id"].isin(want)].reset_index(drop=True)
    return out


def load_ruler_frames(profile: Profile, tags: Sequence[str] = ("base", "sft", "dpo")) -> dict[str, pd.DataFrame]:
    """The ruler-probe records of every tag and decoding that has them (missing ones noted and skipped),
    ``{"<tag> (<decoding>)": records}``."""
    frames = {}
    for tag in tags:
        for dec in profile_decodings(profile):
            try:
                frames[model_label(tag, dec)] = load_probe(profile, tag, dec.name)
            except FileNotFoundError as e:
                print(f"[probe] no ruler curve for {model_label(tag, dec)!r}: {e}")
    return frames


def summarize_probe(df: pd.DataFrame, quantile: float = 0.95) -> dict[str, Any]:
    """Maximum output length (raw and effective, at ``quantile``) and failure shares of one model's outputs."""
    if df.empty:
        raise ValueError("summarize_probe: no outputs")
    by_len = df.groupby("required_length").agg(
        mean_words=("words", "mean"), mean_effective_words=("effective_words", "mean"),
        hit_limit=("hit_limit", "mean"), collapsed=("collapsed", "mean"), n=("words", "size"),
    )
    return {
        "n_outputs": int(len(df)),
        "quantile": quantile,
        "max_output_words_raw": float(np.quantile(df["words"], quantile)),
        "max_output_words_effective": float(np.quantile(df["effective_words"], quantile)),
        "largest_output_words": int(df["words"].max()),
        "median_words": float(df["words"].median()),
        "median_effective_words": float(df["effective_words"].median()),
        "share_hit_limit": float(df["hit_limit"].mean()),
        "share_stopped": float((~df["hit_limit"].astype(bool)).mean()),  # ended by the model, before the token limit
        "share_collapsed": float(df["collapsed"].mean()),
        "by_required_length": {int(k): {c: float(v) for c, v in row.items()} for k, row in by_len.iterrows()},
    }


def summary_table(frames: dict[str, pd.DataFrame], quantile: float = 0.95) -> pd.DataFrame:
    """One row per model: the headline numbers of :func:`summarize_probe`."""
    rows = []
    for label, df in frames.items():
        s = summarize_probe(df, quantile)
        rows.append({
            "model": label, "outputs": s["n_outputs"],
            f"max output words (p{int(quantile * 100)}, raw)": round(s["max_output_words_raw"]),
            f"max output words (p{int(quantile * 100)}, effective)": round(s["max_output_words_effective"]),
            "median words": round(s["median_words"]), "stopped": f"{s['share_stopped']:.0%}",
            "hit token limit": f"{s['share_hit_limit']:.0%}",
            "collapsed into repetition": f"{s['share_collapsed']:.0%}",
        })
    return pd.DataFrame(rows).set_index("model")


def plot_ruler(frames: dict[str, pd.DataFrame], path: str | Path, title: str) -> Path:
    """The paper's Figure 1: mean output length vs required length, log-log, with the line y = x.

    One panel per decoding (the records' ``decoding`` field), its name in the panel title, every panel on the same
    axes; in each, a colour and a marker per model (later ones thinner, so that coinciding curves stay visible):
    solid lines and filled markers raw words, dashed lines and open markers effective words (before collapse).
    One legend for all panels.
    """
    plt = pyplot()

    by_dec: dict[str, dict[str, pd.DataFrame]] = {}
    for name, df in frames.items():
        dec = str(df["decoding"].iloc[0]) if "decoding" in df and len(df) else ""
        by_dec.setdefault(dec, {})[name.removesuffix(f" ({dec})") if dec else name] = df
    models = list(dict.fromkeys(m for d in by_dec.values() for m in d))
    curves = {(dec, name): df.groupby("required_length").agg(words=("words", "mean"), eff=("effective_words", "mean"))
              for dec, group in by_dec.items() for name, df in group.items()}
    xs = [x for g in curves.values() for x in g.index] or [1000]
    ys = [max(y, 1) for g in curves.values() for y in (*g["words"], *g["eff"])] or [1000]
    xlim = (min(xs) * 0.7, max(xs) * 1.4)
    ylim = (min(min(xs), min(ys)) * 0.7, max(max(xs), max(ys)) * 1.4)  # the whole y = x line over the x-range
    n = len(by_dec) or 1
    ncols = min(n, 2)
    nrows = -(-n // ncols)
    legend_rows = len(models) + 1  # raw lines and y = x in one legend column, effective lines in the other
    height = 4.1 * nrows + 1.0 + 0.18 * legend_rows
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols + 0.4, height), squeeze=False, sharex=True, sharey=True)
    flat = [ax for row in axes for ax in row]
    for ax in flat[n:]:
        ax.set_visible(False)
    handles: dict[str, Any] = {}
    for ax, (dec, group) in zip(flat, by_dec.items()):
        for name in group:
            g = curves[(dec, name)]
            k = models.index(name)
            # a colour and a marker per model, thinner and smaller for each later one: models whose curves coincide
            # (a smoke run's) stay visible as nested markers; raw solid and filled, effective dashed and open
            st = {"color": f"C{k % 10}", "marker": "osD^vP*X"[k % 8], "lw": max(2.4 - 0.4 * k, 1.0),
                  "markersize": max(8.5 - 1.5 * k, 4.0)}
            (raw,) = ax.plot(g.index, g["words"].clip(lower=1), linestyle="-", label=f"{name} (raw)", **st)
            (eff,) = ax.plot(g.index, g["eff"].clip(lower=1), linestyle="--", markerfacecolor="none",
                             label=f"{name} (effective)", **st)
            handles.setdefault(raw.get_label(), raw)
            handles.setdefault(eff.get_label(), eff)
        (ref,) = ax.plot(xlim, xlim, "k:", lw=1, label="y = x (the required length)")
        handles.setdefault(ref.get_label(), ref)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(*xlim)
        ax.set_ylim(*ylim)
        ax.set_title(f"decoding: {dec}" if dec else "", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    for i, ax in enumerate(flat[:n]):
        if i % ncols == 0:
            ax.set_ylabel("Output length (words, mean)")
        if i >= n - ncols:
            ax.set_xlabel("Required length (words)")
            ax.xaxis.set_tick_params(labelbottom=True)
    # two legend columns: raw lines and y = x on the left, effective lines on the right
    order = [k for k in handles if k.endswith("(raw)")] + [k for k in handles if k.startswith("y = x")]
    order += [k for k in handles if k not in order]
    fig.legend([handles[k] for k in order], order, loc="lower center", ncol=2, fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 0.0))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, (0.18 * legend_rows + 0.1) / height, 1, 1))
    return save_figure(fig, path)
