"""The LongBench-Write length score and required-length buckets, shared by the benchmark and DPO.

* :func:`length_score`: the official score in [0, 100] of an output's words against the required words
  (official ``evaluation/eval_length.py``): ``S_l`` of the benchmark (:mod:`lwlib.bench`) and the length half of
  a DPO sample's score (:mod:`lwlib.dpo`);
* :data:`BUCKETS` / :data:`BUCKET_NAMES` and :func:`bucket_of`: the paper's Table 2 buckets of required length.

Usage::

    length_score(1000, 1500)      # 83.33
    bucket_of(1500)               # "[500,2k)"
"""

from __future__ import annotations

# The paper's Table 2 buckets of required length: [0,500), [500,2k), [2k,4k), [4k,20k].
BUCKETS: tuple[tuple[str, int, float], ...] = (
    ("[0,500)", 0, 500), ("[500,2k)", 500, 2000), ("[2k,4k)", 2000, 4000), ("[4k,20k]", 4000, float("inf")),
)
BUCKET_NAMES = tuple(b[0] for b in BUCKETS)


def length_score(required: float, actual: float) -> float:
    """The official length score in [0, 100] of ``actual`` output words for ``required`` words.

    Over-long: ``100 * max(0, 1 - (actual/required - 1) / 3)`` (0 at 4x); too short:
    ``100 * max(0, 1 - (required/actual - 1) / 2)`` (0 at 1/3x). An empty output scores 0 (the official
    script divides by zero there).

    >>> round(length_score(1000, 1500), 2)
    83.33
    """
    if required is None or not required > 0:
        raise ValueError(f"length_score: required length must be > 0, got {required!r}")
    if actual is None or actual < 0:
        raise ValueError(f"length_score: actual length must be >= 0, got {actual!r}")
    if actual == 0:
        return 0.0
    if actual > required:
        return 100.0 * max(0.0, 1.0 - (actual / required - 1.0) / 3.0)
    return 100.0 * max(0.0, 1.0 - (required / actual - 1.0) / 2.0)


def bucket_of(required: int) -> str:
    """The paper's required-length bucket of ``required`` words (``[0,500)`` ... ``[4k,20k]``)."""
    for name, lo, hi in BUCKETS:
        if lo <= required < hi:
            return name
    raise ValueError(f"bucket_of: required length {required!r} is negative")
