"""Generate into a store: the one loop behind every stage that samples a model and keeps what it wrote.

The ruler probe, the LongBench-Write predictions, DPO sampling and the self-distilled general data all do
the same thing: find which outputs their store (:class:`lwlib.runs.JsonlStore`) lacks, build a backend only
if there are any, generate them, append a record per output as it arrives, and report failures. Here that is
one routine with one error rule: a failed generation is not stored (a rerun retries it), every successful
one is kept, and once the call ends a ``RuntimeError`` names how many failed and the first few ids.

Jobs of several decodings (several stores) go to the backend in one call, each prompt with its own
:class:`lwlib.backends.GenParams`: the slots engine decodes them in one batch, so a model waits for its longest
rows once, not once per decoding (on an H200 the probe's 96 outputs of both decodings, up to 6,144 tokens, took
about 48 s: benchmarks/README.md).

Usage::

    jobs = [Job(f"{it.id}-s0", it.prompt, params, store, lambda g, it=it: {"response": g.text, ...})
            for it in items]
    generate_into(jobs, make=lambda: make_backend(cfg.backend, model), desc="ruler probe", what="probe (base)")
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .backends import Backend, Generation, GenParams, release
from .runs import JsonlStore


@dataclass
class Job:
    """One output to make.

    Fields:
        key: the record's key in ``store`` (a job whose key the store holds is skipped).
        prompt: a user message or a list of chat messages.
        params: the sampling settings of this output (its decoding and token limit).
        store: where the record goes.
        record: builds the stored record from the :class:`lwlib.backends.Generation` (the key field is set
            from ``key`` if the record lacks it).
    """

    key: str
    prompt: Any
    params: GenParams
    store: JsonlStore
    record: Callable[[Generation], dict[str, Any]]


def todo(jobs: Sequence[Job]) -> list[Job]:
    """The jobs whose record is not in their store yet."""
    return [j for j in jobs if j.key not in j.store]


def generate_into(jobs: Sequence[Job], backend: Backend | None = None, make: Callable[[], Backend] | None = None,
                  desc: str | None = None, what: str = "generation") -> int:
    """Generate every job its store lacks, in one backend call, appending each record as it arrives.

    ``backend`` is used if given; else ``make()`` builds one, only when something is to do, and it is
    released afterwards. Returns the number of records written. Raises ``RuntimeError`` ("<what>: N of M
    generations failed (rerun to retry them): ...") after the call if any failed; the others are stored.
    """
    work = todo(jobs)
    if not work:
        return 0
    own = backend is None
    if own:
        if make is None:
            raise ValueError(f"{what}: {len(work)} outputs to generate and neither a backend nor a way to make one")
        backend = make()
    params: GenParams | list[GenParams] = [j.params for j in work]
    if all(p is work[0].params for p in params):
        params = work[0].params  # one decoding: one settings object, as every backend understands
    errors, written = [], 0
    try:
        for i, g in backend.generate_iter([j.prompt for j in work], params, desc=desc):
            j = work[i]
            if g.error:
                errors.append(f"{j.key}: {g.error}")
                continue
            rec = j.record(g)
            rec.setdefault(j.store.key, j.key)
            j.store.append(rec)
            written += 1
    finally:
        if own:
            release(backend)
    if errors:
        raise RuntimeError(f"{what}: {len(errors)} of {len(work)} generations failed (rerun to retry them): "
                           f"{errors[:3]}")
    return written
