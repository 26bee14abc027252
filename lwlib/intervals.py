"""Numbers with their intervals and their censoring, for claims measured over seeds and prompts.

* **Censoring.** An output that reached the token limit while still writing fresh text (not collapsed into a loop)
  is right-censored: its true length is at least what was seen. A loop ends the effective length before the limit,
  so a collapsed output is never censored. A quantile of lengths with at least ``CENSORED_SHARE`` (5%) of
  censored outputs is only a lower bound (:func:`censored_quantile`): tables print it as ``>= x`` and a rule may use
  it only where a lower bound is conservative (a claimed minimum, the numerator of a ratio).
* **Intervals.** Two-level bootstrap (:func:`bootstrap`): seeds drawn with replacement, then within each drawn seed
  the prompts drawn with replacement, the same prompt draw for every arm of that seed (the arms answered the same
  prompts), all samples of a drawn prompt kept together. The statistic is recomputed on each resample; the 95%
  interval is the 2.5th and 97.5th percentiles.

Data come as :class:`Cells`: per arm an array ``[seeds, prompts, samples]`` of effective words (and of censoring
flags, and of required lengths), built from probe records by :func:`cells`.

Usage::

    c = cells({"cap500": {0: df0, 1: df1}, "uncapped": {0: ..., 1: ...}})
    lo, hi = bootstrap(c, lambda v: censored_quantile(*v["uncapped"])[0] / censored_quantile(*v["cap500"])[0])
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

CENSORED_SHARE = 0.05
N_BOOT = 2000


def unit_ids(ids: pd.Series) -> pd.Series:
    """The prompt or item each record id belongs to: the id without its ``-s<sample>`` suffix (the probe's
    ``ruler-007-s1``, LongBench-Write's ``lbw-007-s1``; an id without the suffix is its own).

    Usage: ``df.groupby(unit_ids(df["id"]))``
    """
    return ids.str.replace(r"-s\d+$", "", regex=True)


def is_censored(df: pd.DataFrame) -> pd.Series:
    """Outputs at the token limit that had not collapsed into a loop (their length is a lower bound)."""
    return df["hit_limit"].astype(bool) & ~df["collapsed"].astype(bool)


def censored_quantile(values: np.ndarray, censored: np.ndarray, q: float = 0.95) -> tuple[float, bool, float]:
    """``(quantile q of values, whether it is only a lower bound, share of censored values)``: a lower bound when at
    least :data:`CENSORED_SHARE` of the values are censored.

    Usage: ``p95, lower_bound, share = censored_quantile(words, at_limit)``
    """
    values, censored = np.asarray(values, float).ravel(), np.asarray(censored, bool).ravel()
    if values.size == 0:
        return float("nan"), False, float("nan")
    share = float(censored.mean())
    return float(np.quantile(values, q)), share >= CENSORED_SHARE, share


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN for fewer than 3 points or a constant side."""
    x, y = np.asarray(x, float).ravel(), np.asarray(y, float).ravel()
    if x.size != y.size:
        raise ValueError("spearman: arrays of different lengths")
    if x.size < 3:
        return float("nan")
    rx, ry = pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy()
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def best_spearman(values: list[float | None]) -> float:
    """The largest Spearman correlation of ``values`` with their order (1, 2, ..., n) that any values of the runs not
    measured yet (``None``) could give: what a rule "Spearman >= x" can still reach before they are. Each missing
    value is tried below, between and above the measured ones (every relative order; ties are not needed).

    Usage: ``best_spearman([833, 6987, 6430, 6754, None, None])  # 0.83: both missing runs on top at best``
    """
    known = sorted(float(v) for v in values if v is not None)
    missing = [i for i, v in enumerate(values) if v is None]
    if not missing:
        return spearman(np.arange(len(values)), np.asarray(values, float))
    edges = [known[0] - 2.0] + known + [known[-1] + 2.0] if known else [0.0, 1.0]
    spots = [a + (b - a) * f for a, b in zip(edges, edges[1:]) for f in (1 / 3, 2 / 3)]  # two places in every gap
    best = float("-inf")
    for pick in itertools.product(spots, repeat=len(missing)):
        if len(set(pick)) < len(pick):
            continue
        full = list(values)
        for i, v in zip(missing, pick):
            full[i] = v
        best = max(best, spearman(np.arange(len(full)), np.asarray(full, float)))
    return best


@dataclass
class Cells:
    """Per arm, ``[seeds, prompts, samples]`` arrays over the same seeds and prompts.

    Fields:
        seeds: the seed indices (axis 0).
        prompts: the prompt ids (axis 1).
        words: ``{arm: effective words}``.
        censored: ``{arm: censoring flags}`` (:func:`is_censored`).
        required: ``[prompts]`` the words each prompt asked for.
    """

    seeds: list[int]
    prompts: list[str]
    words: dict[str, np.ndarray]
    censored: dict[str, np.ndarray]
    required: np.ndarray

    def view(self, s: np.ndarray | slice = slice(None), p: np.ndarray | slice = slice(None)
             ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """``{arm: (words, censored)}`` of the seeds ``s`` and prompts ``p`` (``p`` ``[len(s), P]`` per seed)."""
        if isinstance(s, slice):
            return {a: (self.words[a][s, p], self.censored[a][s, p]) for a in self.words}
        idx = (s[:, None], p)
        return {a: (self.words[a][idx], self.censored[a][idx]) for a in self.words}


def cells(frames: dict[str, dict[int, pd.DataFrame]], column: str = "effective_words") -> Cells:
    """:class:`Cells` from probe records ``{arm: {seed: records}}``: the seeds every arm has, the prompts every one
    of them answered, the samples every prompt has in all of them (prompt id = the record's ``id`` without its
    ``-s<sample>`` suffix)."""
    if not frames:
        raise ValueError("cells: no arms")
    seeds = sorted(set.intersection(*(set(by) for by in frames.values())))
    if not seeds:
        raise ValueError(f"cells: no seed is shared by every arm ({ {a: sorted(by) for a, by in frames.items()} })")
    tables = {}
    for arm, by in frames.items():
        for k in seeds:
            df = by[k].assign(prompt=unit_ids(by[k]["id"]))
            tables[arm, k] = df
    prompts = sorted(set.intersection(*(set(t["prompt"]) for t in tables.values())))
    samples = sorted(set.intersection(*(set(t["sample"]) for t in tables.values())))
    if not prompts or not samples:
        raise ValueError("cells: the arms share no prompt (or no sample index)")
    words, cens = {}, {}
    for arm in frames:
        w = np.empty((len(seeds), len(prompts), len(samples)))
        c = np.empty_like(w, dtype=bool)
        for i, k in enumerate(seeds):
            t = tables[arm, k].set_index(["prompt", "sample"])
            t = t.loc[pd.MultiIndex.from_product([prompts, samples])]
            w[i] = t[column].to_numpy(float).reshape(len(prompts), len(samples))
            c[i] = is_censored(t).to_numpy().reshape(len(prompts), len(samples))
        words[arm], cens[arm] = w, c
    first = tables[next(iter(frames)), seeds[0]].drop_duplicates("prompt").set_index("prompt")
    return Cells(seeds, prompts, words, cens, first.loc[prompts, "required_length"].to_numpy(float))


def bootstrap(c: Cells, stat: Callable[[dict[str, tuple[np.ndarray, np.ndarray]], np.ndarray], float],
              n_boot: int = N_BOOT, seed: int = 0) -> tuple[float, float]:
    """The 95% interval of ``stat(view, required)`` over two-level resamples (seeds, then prompts within each seed,
    shared by the arms); ``view`` is :meth:`Cells.view` of the resample and ``required`` the resampled prompts'
    required lengths ``[seeds, prompts]``. NaN resamples are dropped (all NaN: ``(nan, nan)``)."""
    rng = np.random.default_rng(seed)
    n_s, n_p = len(c.seeds), len(c.prompts)
    out = np.empty(n_boot)
    for b in range(n_boot):
        s = rng.integers(0, n_s, n_s)
        p = rng.integers(0, n_p, (n_s, n_p))
        out[b] = stat(c.view(s, p), c.required[p])
    out = out[~np.isnan(out)]
    if out.size == 0:
        return float("nan"), float("nan")
    return float(np.percentile(out, 2.5)), float(np.percentile(out, 97.5))


def fmt_words(value: float, lower_bound: bool = False) -> str:
    """``"12,345"`` or ``">= 12,345"`` (a censored quantile)."""
    if value != value:
        return "n/a"
    return f"{'>= ' if lower_bound else ''}{value:,.0f}"
