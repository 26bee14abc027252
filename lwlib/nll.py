"""Negative log-likelihood by position (the paper's Figure 7).

For each conversation (prompt messages + one assistant response) the model is run once over the
chat-formatted prompt followed by the response, and the negative log-likelihood of every response token
given everything before it is recorded. The paper then plots, for every position ``t`` of the response,
the *cumulative average* NLL ``c_t = mean(nll_1 .. nll_t)`` of each sample, averaged over the samples whose
response reaches position ``t`` (a sample shorter than ``t`` does not count at ``t``), on a log x-axis: a
model that uses the long output it has written so far keeps lowering this curve as ``t`` grows.

Details (the per-token log-likelihood is :mod:`lwlib.logprobs`, shared with DPO):
  * Response tokens are those after the tokenized prompt (``apply_chat_template(add_generation_prompt=True)``)
    in the tokenized whole conversation, up to (by default not including) the first end-of-turn token.
  * The model is called with ``use_cache=False``, several sequences per batch (right padding, so positions
    of real tokens are unchanged). Long sequences are *chunked over positions*: the transformer body runs
    once and the output head + log-softmax are applied ``chunk_size`` positions at a time, so the
    ``tokens x vocabulary`` logits of a 32k-token sequence are never held at once. The result is the same
    as unchunked (tested) because the head acts on each position independently.
  * ``max_tokens`` cuts prompt + response to the model's context (the kept response prefix is recorded).

Usage::

    cfg = prof.section("nll", NLLConfig)
    df = run_nll(prof, "sft", cfg)                       # one row per sample, list column "nll"
    curve = cumulative_curve(df["nll"].tolist())         # position, cum_avg_nll, samples
    plot_nll({"base": c0, "sft": c1}, path, title)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .config import Profile
from .typed import check_sizes
from .logprobs import token_nll
from .plots import distinct_style, pyplot, save_figure
from .runs import (JsonlStore, atomic_write_json, atomic_write_text, data_fingerprint, model_fingerprint, read_jsonl,
                   read_records, write_manifest)

Messages = list[dict[str, str]]


@dataclass
class NLLConfig:
    """Section ``nll`` of a profile.

    Fields:
        data_path: conversations to score (LongWriter-6k JSONL, ``{"messages": [...]}``); ``corpus`` =
            ``<run>/corpus/heldout_nll.jsonl`` (human-written passages of whole books held out of SFT,
            :mod:`lwlib.corpus`); null = ``<run>/agentwrite/heldout.jsonl`` (notebook 02's held-out AgentWrite
            items), falling back (with a printed note) to ``<run>/agentwrite/longwriter.jsonl`` when there is no
            held-out file.
        models: model tags to score (``base``, ``sft``, ``dpo`` or a path; see ``lwlib.models.run_model``);
            tags whose checkpoint does not exist are skipped with a note.
        max_samples: at most this many conversations (the first ones in the file); null = all.
        max_tokens: cut prompt + response to this many tokens (the model's context); null = no cut.
        batch_size: sequences per forward pass.
        chunk_size: positions per output-head/log-softmax chunk (memory bound on the logits); 0 = whole
            sequence at once. Results do not depend on it.
        include_end_token: also score the end-of-turn token that closes the response.
        overwrite: when a tag's stored NLLs were made with other settings (model, data file, max_tokens,
            include_end_token; lwlib.runs.StaleRunError), move them aside and start anew instead of refusing.
    """

    data_path: str | None = None
    models: list[str] = field(default_factory=lambda: ["base", "sft", "dpo"])
    max_samples: int | None = None
    max_tokens: int | None = None
    batch_size: int = 4
    chunk_size: int = 2048
    include_end_token: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        check_sizes(self, "nll", 1, "max_samples")
        if self.batch_size < 1:
            raise ValueError(f"nll.batch_size must be >= 1, got {self.batch_size}")
        if self.chunk_size < 0:
            raise ValueError(f"nll.chunk_size must be >= 0, got {self.chunk_size}")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise ValueError(f"nll.max_tokens must be >= 2 or null, got {self.max_tokens}")


# ------------------------------------------------------------------------------------------ aggregates

def cumulative_average(nll: Sequence[float]) -> np.ndarray:
    """``c_t = mean(nll[0..t])`` for every position ``t`` of one sample."""
    a = np.asarray(nll, dtype=np.float64)
    return np.cumsum(a) / np.arange(1, len(a) + 1) if len(a) else a


def cumulative_curve(samples: Sequence[Sequence[float]]) -> pd.DataFrame:
    """The Figure 7 curve: at each position (1-based), the mean over the samples that reach it of their
    cumulative average NLL. Columns: ``position``, ``cum_avg_nll``, ``samples`` (how many reach it)."""
    lens = [len(s) for s in samples]
    if not lens or max(lens) == 0:
        return pd.DataFrame({"position": [], "cum_avg_nll": [], "samples": []})
    width = max(lens)
    total = np.zeros(width)
    count = np.zeros(width, dtype=np.int64)
    for s in samples:
        c = cumulative_average(s)
        total[: len(c)] += c
        count[: len(c)] += 1
    return pd.DataFrame({"position": np.arange(1, width + 1), "cum_avg_nll": total / count, "samples": count})


# ------------------------------------------------------------------------------------------------ stage

def nll_data_path(prof: Profile, cfg: NLLConfig) -> Path:
    """The file :func:`run_nll` scores (see ``NLLConfig.data_path``); prints a note on the fallback."""
    if cfg.data_path == "corpus":
        p = prof.run_dir / "corpus" / "heldout_nll.jsonl"
        if not p.exists():
            raise FileNotFoundError(f"no {p}: run the corpus section of notebooks/02_agentwrite.ipynb for profile "
                                    f"{prof.name!r} first")
        return p
    if cfg.data_path:
        p = Path(cfg.data_path)
        if not p.exists():
            raise FileNotFoundError(f"nll.data_path: {p} does not exist")
        return p
    aw = prof.run_dir / "agentwrite"
    held = aw / "heldout.jsonl"
    if held.exists() and held.stat().st_size > 0:
        return held
    full = aw / "longwriter.jsonl"
    if full.exists():
        print(f"note: no held-out file {held}; scoring {full} instead (these items may have been trained on)")
        return full
    raise FileNotFoundError(f"no {held} or {full}: run notebooks/02_agentwrite.ipynb for profile {prof.name!r} "
                            "first (or set nll.data_path)")


def load_conversations(path: str | Path, max_samples: int | None = None) -> list[tuple[str, Messages]]:
    """``(id, messages)`` pairs from LongWriter-6k JSONL (id: the record's ``id`` or ``line<N>``)."""
    out = []
    for k, rec in enumerate(read_jsonl(path)):
        msgs = rec.get("messages") if isinstance(rec, dict) else None
        if not isinstance(msgs, list) or not msgs or not isinstance(msgs[-1], dict) \
                or msgs[-1].get("role") != "assistant":
            raise ValueError(f"{path}: record {k + 1} needs 'messages' ending with an assistant message")
        out.append((str(rec.get("id", f"line{k + 1}")), msgs))
        if max_samples is not None and len(out) >= max_samples:
            break
    if not out:
        raise ValueError(f"{path}: no conversations")
    return out


def run_nll(prof: Profile, tag: str, cfg: NLLConfig | None = None, model_and_tok=None) -> pd.DataFrame:
    """Per-token NLL of the held-out responses under model ``tag``; resumable.

    Writes ``<run>/nll/<tag>/token_nll.jsonl`` (per sample: id, tokens, nll list, mean) and
    ``curve.csv`` (:func:`cumulative_curve`). Returns one row per sample."""
    from .models import load_model, run_model

    cfg = cfg or prof.section("nll", NLLConfig)
    path = nll_data_path(prof, cfg)
    out = prof.stage_dir("nll") / tag
    try:
        model_name = run_model(prof, tag)
    except FileNotFoundError:  # the checkpoint is gone: an earlier sitting's complete records are read back
        done = nll_before(prof, tag, cfg)
        if done is None:
            raise
        return done
    fingerprint = {"model": model_fingerprint(model_name, prof.run_dir), "data": data_fingerprint(path),
                   "max_tokens": cfg.max_tokens, "include_end_token": cfg.include_end_token,  # ids are line numbers
                   **prof.numerics()}  # the model's device and dtype
    store = JsonlStore(out / "token_nll.jsonl", key="id", fingerprint=fingerprint, overwrite=cfg.overwrite,
                       stage="nll")
    write_manifest(out, {"profile": prof.resolved(), "nll": dataclasses.asdict(cfg), "tag": tag,
                         "model": model_name, "data": str(path), "fingerprint": fingerprint})
    convs = load_conversations(path, cfg.max_samples)
    todo = [(i, m) for i, m in convs if i not in store]
    if todo:
        model, tok = model_and_tok or load_model(model_name, prof.device, prof.dtype)
        for s in range(0, len(todo), cfg.batch_size):  # store each batch as soon as it is done
            part = todo[s : s + cfg.batch_size]
            res = token_nll(model, tok, [m for _, m in part], cfg.batch_size, cfg.chunk_size,
                            cfg.include_end_token, cfg.max_tokens, desc=f"NLL ({tag})")
            for (i, _), r in zip(part, res):
                store.append({"id": i, "tag": tag, "model": model_name, "tokens": int(len(r)),
                              "mean_nll": float(r.mean()) if len(r) else None,
                              "nll": [round(float(x), 5) for x in r]})
    want = {i for i, _ in convs}
    df = pd.DataFrame([r for r in store.records() if r["id"] in want])
    atomic_write_text(out / "curve.csv", cumulative_curve(df["nll"].tolist()).to_csv(index=False))
    atomic_write_json(out / "summary.json", {"samples": int(len(df)), "tokens": int(df["tokens"].sum()),
                                             "mean_token_nll": float(np.concatenate(df["nll"].map(np.asarray).tolist()).mean())})
    return df


def nll_before(prof: Profile, tag: str, cfg: NLLConfig | None = None) -> pd.DataFrame | None:
    """The stored NLLs of ``tag`` when an earlier sitting scored every selected conversation (its checkpoint may be
    gone: a session keeps records, not checkpoints), read without the store's fingerprint check (which needs the
    checkpoint); else None. One row per sample, as :func:`run_nll` returns them.

    Usage: ``df = nll_before(prof, "cap500")``
    """
    cfg = cfg or prof.section("nll", NLLConfig)
    path = prof.stage_dir("nll") / tag / "token_nll.jsonl"
    want = {i for i, _ in load_conversations(nll_data_path(prof, cfg), cfg.max_samples)}
    recs = [r for r in read_records(path) if r["id"] in want] if path.exists() else []
    return pd.DataFrame(recs) if recs and {r["id"] for r in recs} == want else None


def nll_tags(prof: Profile, cfg: NLLConfig | None = None) -> list[str]:
    """``cfg.models`` that can be scored: those whose model exists, and those an earlier sitting scored in full
    (:func:`nll_before`); each other one is skipped with a note (:func:`lwlib.models.available_tags`).

    Usage: ``frames = {t: run_nll(prof, t, cfg) for t in nll_tags(prof, cfg)}``
    """
    from .models import available_tags

    cfg = cfg or prof.section("nll", NLLConfig)
    return available_tags(prof, cfg.models, "nll", done=lambda t: nll_before(prof, t, cfg) is not None)


def plot_nll(curves: dict[str, pd.DataFrame], path: str | Path, title: str, min_samples: int = 1) -> Path:
    """Figure 7 style: cumulative average NLL vs position (log x), one line per model, each with its own colour,
    line style and markers, so that curves lying on each other stay visible. Where a model's curve lies on the
    previous model's (``dpo`` on ``sft``: within 2% of the panel's height everywhere), its legend entry says so and a
    lower panel draws the difference (``dpo - sft``) on a scale where it shows. Positions reached by fewer than
    ``min_samples`` samples are not drawn."""
    plt = pyplot()

    names = list(curves)
    kept = {k: c[c["samples"] >= min_samples].set_index("position")["cum_avg_nll"] for k, c in curves.items()}
    values = np.concatenate([c.to_numpy(float) for c in kept.values()] or [np.zeros(1)])
    span = float(np.nanmax(values) - np.nanmin(values)) if len(values) else 0.0
    close = []  # (model, previous model, difference) of curves that lie on each other
    for i in range(1, len(names)):
        d = (kept[names[i]] - kept[names[i - 1]]).dropna()
        if len(d) and float(abs(d).max()) <= 0.02 * max(span, 1e-9):
            close.append((names[i], names[i - 1], d))
    fig, axes = plt.subplots(2 if close else 1, 1, figsize=(6.8, 6.2 if close else 4.6), sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": [3, 1.4] if close else [1]})
    ax = axes[0][0]
    for k, name in enumerate(names):
        c = kept[name]
        near = [f"within {float(abs(d).max()):.2g} of {prev}" for cur, prev, d in close if cur == name]
        label = name + (f" ({near[0]}: see below)" if near else "")
        ax.plot(c.index, c.to_numpy(), lw=max(2.4 - 0.5 * k, 1.2), markersize=5, markevery=_log_marks(c.index, k),
                label=label, **distinct_style(k))
    ax.set_xscale("log")
    ax.set_ylabel("Cumulative average NLL")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=9)
    if close:
        dx = axes[1][0]
        dx.axhline(0, color="0.5", lw=0.8)
        for cur, prev, d in close:
            st = distinct_style(names.index(cur))
            dx.plot(d.index, d.to_numpy(), color=st["color"], linestyle=st["linestyle"], lw=1.4, label=f"{cur} - {prev}")
        dx.set_ylabel("difference")
        dx.set_title("curves that lie on each other above: their difference", fontsize=9)
        dx.grid(True, which="both", alpha=0.3)
        dx.legend(fontsize=8)
    axes[-1][0].set_xlabel("Position in the response (tokens, log scale)")
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)


def _log_marks(positions: pd.Index, k: int, per_decade: int = 3) -> list[int]:
    """Indices of ``positions`` at log-spaced points (``per_decade`` a decade), shifted per curve ``k`` so that the
    markers of coinciding curves do not cover each other."""
    pos = np.asarray(positions, dtype=float)
    if len(pos) == 0:
        return []
    lo, hi = np.log10(max(pos.min(), 1)), np.log10(pos.max())
    targets = 10 ** (np.arange(lo, hi + 1e-9, 1 / per_decade) + (k % 3) / (3 * per_decade))
    idx = np.searchsorted(pos, targets[targets <= pos.max()])
    return sorted({int(i) for i in idx if i < len(pos)})


def nll_table(frames: dict[str, pd.DataFrame], positions: Sequence[int] = (10, 100, 1000, 10000)) -> pd.DataFrame:
    """One row per model: samples, response tokens, mean token NLL, and the Figure 7 curve's value at
    ``positions`` (NaN where no sample reaches them)."""
    rows = []
    for tag, df in frames.items():
        c = cumulative_curve(df["nll"].tolist()).set_index("position")
        row = {"model": tag, "samples": len(df), "tokens": int(df["tokens"].sum()),
               "mean token NLL": float(np.concatenate(df["nll"].map(np.asarray).tolist()).mean())}
        for p in positions:
            row[f"cum. avg NLL @{p}"] = float(c.at[p, "cum_avg_nll"]) if p in c.index else float("nan")
        rows.append(row)
    return pd.DataFrame(rows).set_index("model")
