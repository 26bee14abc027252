"""The LLM judge of LongBench-Write quality (official ``evaluation/eval_quality.py``), one for every stage that
judges: the benchmark (:mod:`lwlib.bench`, ``S_q``) and DPO (:mod:`lwlib.dpo`, the quality half of a sample's score).

* prompt: :func:`judge_prompt` fills the official template (``lwlib/prompts/judge.txt``, verbatim, :func:`judge_template`);
* parse: :func:`parse_judgement` reads the six dimension scores (integers 1-5, :data:`JUDGE_DIMENSIONS`) from an
  answer, or None when it is unusable;
* score: :func:`quality_score` maps them to 0-100 (the mean over dimensions of ``(score - 1) * 25``);
* config: :class:`JudgeConfig`, the ``judge`` field of the ``bench`` and ``dpo`` sections: a
  :class:`lwlib.backends.BackendConfig` (who answers) plus how to judge (kind, temperature, tokens, tries);
  :func:`make_judge` builds the backend it names: an API model, the "local judge" (:class:`LocalJudge`, a local
  model served through :mod:`lwlib.serve`, or called directly) or none;
* calls: :func:`judge_many` judges ``(prompt, response)`` pairs in rounds, retrying unusable answers with a new
  seed (official: 5 tries); :func:`judge_one` one pair;
* the cache: :class:`JudgeCache`, judge results on disk keyed by (judge model, prompt, response)
  (:func:`cache_key`), opened for a config by :func:`judge_cache`;
* the loop: :func:`judge_records` judges a stage's records into its store (resumable): what the store holds is
  skipped (a record stored by another judge model is an error), the cache answers first, responses are cut to
  ``max_response_words``, and transport errors come back unstored so that a rerun retries them.

Usage::

    scores = judge_one(judge_backend, prompt, response)   # {"Relevance": 4, ...} or None
    quality_score(scores)                                 # mean over dimensions of (s - 1) * 25

    judge = make_judge(prof, cfg.judge, where="bench.judge")
    cache = judge_cache(prof.stage_dir("bench") / "judge_cache.jsonl", cfg.judge, prof.seed, stage="bench")
    errors = judge_records(records, judge, cfg.judge, store, make_record, cache, seed=prof.seed)
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .backends import Backend, BackendConfig, GenParams, LocalBackend, OpenAIBackend, make_backend
from .runs import JsonlStore, sha256_file
from .text import count_words, truncate_words
from .typed import check_sizes

JUDGE_DIMENSIONS: tuple[str, ...] = (
    "Relevance", "Accuracy", "Coherence", "Clarity", "Breadth and Depth", "Reading Experience",
)
JUDGE_TEMPLATE_PATH = Path(__file__).parent / "prompts" / "judge.txt"


# ----------------------------------------------------------------------------------------- prompt


def judge_template() -> str:
    """The official judge prompt (``lwlib/prompts/judge.txt``, verbatim from THUDM/LongWriter)."""
    return JUDGE_TEMPLATE_PATH.read_text(encoding="utf-8")


def judge_prompt(prompt: str, response: str) -> str:
    """Fill the official template as the official code does (``$INST$`` then ``$RESPONSE$``)."""
    return judge_template().replace("$INST$", prompt).replace("$RESPONSE$", response)


# ----------------------------------------------------------------------------------------- parse


_FENCE = re.compile(r"```(?:json|JSON)?[ \t]*\n?(.*?)```", re.DOTALL)


def _json_objects(text: str) -> Iterator[dict]:
    """Every JSON object that decodes at some ``{`` in ``text`` (trailing text tolerated)."""
    dec = json.JSONDecoder(strict=False)  # strict=False: raw newlines inside strings (the official code strips them)
    for m in re.finditer(r"\{", text):
        try:
            obj, _ = dec.raw_decode(text, m.start())
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            yield obj


def _as_score(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, str):
        v = v.strip()
        if not re.fullmatch(r"[1-5](\.0+)?", v):
            return None
        v = float(v)
    if isinstance(v, (int, float)) and float(v).is_integer() and 1 <= v <= 5:
        return int(v)
    return None


def _scores_from(obj: dict) -> dict[str, int] | None:
    norm = {re.sub(r"\s+", " ", str(k)).strip().lower(): v for k, v in obj.items()}
    out = {}
    for dim in JUDGE_DIMENSIONS:
        v = obj[dim] if dim in obj else norm.get(dim.lower())
        s = _as_score(v)
        if s is None:
            return None
        out[dim] = s
    return out


def parse_judgement(text: str | None) -> dict[str, int] | None:
    """The six dimension scores (integers 1-5) of a judge answer, or None if it is unusable.

    Looks in ```` ```json ```` fenced blocks first, then at every JSON object in the text (trailing
    text is ignored). An object missing a dimension or with a score outside 1-5 (or not an integer)
    is rejected. Keys match case- and whitespace-insensitively.

    >>> parse_judgement('```json\\n{"Analysis": "ok", "Relevance": 5, ...}\\n```')  # doctest: +SKIP
    """
    if not text:
        return None
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    for chunk in candidates:
        for obj in _json_objects(chunk):
            s = _scores_from(obj)
            if s is not None:
                return s
    return None


def quality_score(scores: dict[str, Any]) -> float:
    """``S_q`` of one judgement: the mean over the six dimensions of ``(score - 1) * 25`` (0-100)."""
    missing = [d for d in JUDGE_DIMENSIONS if d not in scores]
    if missing:
        raise ValueError(f"quality_score: missing dimension(s) {missing}")
    return float(np.mean([(float(scores[d]) - 1.0) * 25.0 for d in JUDGE_DIMENSIONS]))


# ----------------------------------------------------------------------------------------- config


@dataclass
class JudgeConfig(BackendConfig):
    """The ``judge`` field of the ``bench`` and ``dpo`` sections: who judges quality, and how.

    A :class:`lwlib.backends.BackendConfig` (every field of it: the judge model, ``base_url``, ``api_key_env``,
    ``concurrency``, ``max_retries``, ``batch_size``, the local engine ...) whose ``kind`` may also be ``none``,
    and whose ``timeout_s`` defaults to 600 s, plus the fields of judging.

    Fields:
        kind: ``local`` (a local model, reported as "local judge"; through ``lwlib.serve`` unless ``serve: false``),
            ``openai`` (any OpenAI-compatible API) or ``none`` (no quality scores: S_q and S are left empty in the
            benchmark, DPO pairs rest on length alone).
        model: judge model: API model id (paper: ``gpt-4o-2024-05-13``) or, for ``local``, anything
            ``load_model`` accepts (empty = the profile's model).
        temperature: judge sampling temperature (paper: 0.5).
        max_tokens: judge answer budget (paper: 1024).
        max_tries: attempts per item on unparseable/incomplete answers (official code: 5).
        max_response_words: cut responses to this many words before judging (a local judge's context
            is small); null = never (paper). Cut items are flagged ``judge_truncated``.
        base_url: API server (openai); null = api.openai.com.
        api_key_env: environment variable holding the API key (openai).
        concurrency: requests in flight.
        max_retries: transport retries per request (openai client, with backoff).
        timeout_s: per-request timeout (s); null = derived from the answer budget (``timeout_base_s +
            max_tokens / min_tokens_per_s``, as for any OpenAI-compatible backend).
        batch_size: batch size of the local judge model.
        serve: local judge only: true = call it through the OpenAI-compatible ``lwlib.serve`` server
            (one request at a time); false = call the local backend directly (batched, faster on GPU).
        (others): as in :class:`lwlib.backends.BackendConfig` (the local engine's fields apply to the local judge
            model, ``timeout_base_s``/``min_tokens_per_s``/``deadline_s`` to an API judge).
    """

    kind: Literal["local", "openai", "none"] = "local"
    timeout_s: float | None = 600.0
    temperature: float = 0.5
    max_tokens: int = 1024
    max_tries: int = 5
    max_response_words: int | None = None
    serve: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        check_sizes(self, "judge", 1, "max_tokens", "max_tries", "max_response_words")


def judge_model_id(backend: Any) -> str:
    """The judge's model id used in cache keys (``OpenAIBackend.model``, else the backend's name)."""
    return str(getattr(backend, "model", None) if isinstance(getattr(backend, "model", None), str) else backend.name)


def judge_label(backend: Any) -> str:
    """How a judge is named in tables: ``local judge (<model>)`` for a local one, else its model id."""
    return getattr(backend, "label", None) or judge_model_id(backend)


def judging_fingerprint(cfg: JudgeConfig, judge_model: str, seed: int | None) -> dict[str, Any]:
    """What a judge's answers depend on besides (prompt, response): the judge model, answer tokens, temperature,
    tries, seed and the template (its sha256); the fingerprint of judgement stores and (without ``judge``, which
    the keys name) of :class:`JudgeCache`."""
    return {"judge": judge_model, "max_tokens": cfg.max_tokens, "temperature": cfg.temperature,
            "max_tries": cfg.max_tries, "seed": seed, "template": sha256_file(JUDGE_TEMPLATE_PATH)[:16]}


# ----------------------------------------------------------------------------------------- calls


def cache_key(judge_model: str, prompt: str, response: str) -> str:
    """sha256 of (judge model, prompt, response): the judge cache's key."""
    return hashlib.sha256(json.dumps([judge_model, prompt, response], ensure_ascii=False).encode()).hexdigest()


@dataclass
class JudgeResult:
    """The outcome of judging one response: ``scores`` (None = failed after ``tries``), the raw
    answers of every try, and ``error`` (a transport error on the last try; such results are not
    cached, so a resumed run retries them)."""

    scores: dict[str, int] | None
    tries: int
    outputs: list[str]
    error: str | None = None

    @property
    def status(self) -> str:
        return "ok" if self.scores is not None else ("error" if self.error else "failed")


def _judge_params(params: GenParams | None, attempt: int) -> GenParams:
    p = dataclasses.replace(params) if params is not None else GenParams(max_new_tokens=1024, temperature=0.5, seed=0)
    if p.seed is not None:
        p.seed = p.seed + attempt  # a new sample on every retry (a fixed seed would repeat the answer)
    return p


def judge_many(
    backend: Backend,
    pairs: Sequence[tuple[str, str]],
    max_tries: int = 5,
    params: GenParams | None = None,
    desc: str = "judge",
) -> Iterator[tuple[int, JudgeResult]]:
    """Judge ``(prompt, response)`` pairs in rounds; yields ``(index, JudgeResult)`` as items finish.

    Each round sends every still-unjudged item at once (batched / concurrent), parses the answers
    with :func:`parse_judgement` and retries the rest with a new seed, up to ``max_tries`` rounds.
    """
    outputs: list[list[str]] = [[] for _ in pairs]
    errors: list[str | None] = [None] * len(pairs)
    pending = list(range(len(pairs)))
    prompts = [judge_prompt(p, r) for p, r in pairs]
    for attempt in range(max_tries):
        if not pending:
            break
        still = []
        gp = _judge_params(params, attempt)
        for j, g in backend.generate_iter([prompts[i] for i in pending], gp, desc=f"{desc} (try {attempt + 1})"):
            i = pending[j]
            errors[i] = g.error
            outputs[i].append(g.text if not g.error else f"<error: {g.error}>")
            s = None if g.error else parse_judgement(g.text)
            if s is not None:
                yield i, JudgeResult(s, attempt + 1, outputs[i])
            else:
                still.append(i)
        pending = sorted(still)
    for i in pending:
        yield i, JudgeResult(None, len(outputs[i]), outputs[i], errors[i])


def judge_one(
    backend: Backend,
    prompt: str,
    response: str,
    max_tries: int = 5,
    params: GenParams | None = None,
    cache: JudgeCache | None = None,
) -> dict[str, int] | None:
    """Judge one response with the official prompt; the six scores, or None after ``max_tries``
    unusable answers. ``params`` default to the paper's (temperature 0.5, 1024 tokens). With a
    ``cache`` (:class:`JudgeCache`), a (judge model, prompt, response) judged before is not re-sent.

    Usage: ``s = judge_one(be, prompt, response); quality_score(s) if s else None``
    """
    if cache is not None:
        hit = cache.get(judge_model_id(backend), prompt, response)
        if hit is not None:
            return hit.scores
    _, res = next(iter(judge_many(backend, [(prompt, response)], max_tries, params)))
    if cache is not None:
        cache.put(judge_model_id(backend), prompt, response, res)
    return res.scores


class JudgeCache:
    """Judge results on disk (JSONL), keyed by :func:`cache_key`; transport errors are not cached.

    ``fingerprint``: the judging settings the cached answers depend on besides the key (tokens, temperature,
    tries, template), checked as :class:`lwlib.runs.JsonlStore` does; ``stage`` names the profile section in
    its messages.

    Usage: ``cache = JudgeCache(prof.stage_dir("bench") / "judge_cache.jsonl")``, or :func:`judge_cache`
    """

    def __init__(self, path: str | Path, fingerprint: dict | None = None, overwrite: bool = False,
                 stage: str = "bench"):
        self.store = JsonlStore(path, key="key", fingerprint=fingerprint, overwrite=overwrite, stage=stage)

    def get(self, judge_model: str, prompt: str, response: str) -> JudgeResult | None:
        rec = self.store.get(cache_key(judge_model, prompt, response))
        if rec is None:
            return None
        return JudgeResult(rec["scores"], rec["tries"], rec["outputs"])

    def put(self, judge_model: str, prompt: str, response: str, res: JudgeResult) -> None:
        k = cache_key(judge_model, prompt, response)
        if res.error or k in self.store:
            return
        self.store.append({"key": k, "judge_model": judge_model, "scores": res.scores, "tries": res.tries,
                           "outputs": res.outputs})


def judge_cache(path: str | Path, cfg: JudgeConfig, seed: int | None, stage: str = "bench",
                overwrite: bool = False) -> JudgeCache:
    """The :class:`JudgeCache` at ``path`` for answers judged under ``cfg`` and ``seed`` (fingerprint: the
    judging settings of :func:`judging_fingerprint`, less the judge model, which the keys name)."""
    fp = {k: v for k, v in judging_fingerprint(cfg, "", seed).items() if k != "judge"}
    return JudgeCache(path, fingerprint=fp, overwrite=overwrite, stage=stage)


# ----------------------------------------------------------------------------------------- backends


class LocalJudge(OpenAIBackend):
    """A local model served through :func:`lwlib.serve.serve` and called as an OpenAI-compatible judge.

    Reported as ``local judge (<model>)``; close it (or use it as a context manager) to stop the server.
    """

    def __init__(self, model: str, device: str = "auto", dtype: str = "auto", batch_size: int = 8,
                 concurrency: int = 8, timeout_s: float | None = 600.0, local_backend: Backend | None = None):
        from contextlib import ExitStack

        from .serve import serve

        self._stack = ExitStack()
        inner = local_backend or LocalBackend(model, batch_size=batch_size, device=device, dtype=dtype)
        server = self._stack.enter_context(serve(inner, model_name=f"local:{model}"))
        super().__init__(server.model, base_url=server.url, concurrency=concurrency, max_retries=2,
                         timeout_s=timeout_s, name=f"local:{model}")
        self.server = server
        self.label = f"local judge ({model})"

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> LocalJudge:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _local_model(cfg: JudgeConfig, model: str, device: str, dtype: str, name: str | None = None) -> LocalBackend:
    return LocalBackend(
        model, batch_size=cfg.batch_size, device=device, dtype=dtype, name=name,
        cache_implementation=cfg.cache_implementation, compile=cfg.compile, engine=cfg.engine,
        segment_tokens=cfg.segment_tokens, max_batch=cfg.max_batch, batch_buckets=cfg.batch_buckets,
        cache_buckets=cfg.cache_buckets, prefill_tokens=cfg.prefill_tokens, kv_cache_gb=cfg.kv_cache_gb,
        cuda_graphs=cfg.cuda_graphs,
    )


def make_judge(profile: Any, cfg: JudgeConfig, where: str = "judge") -> Backend | None:
    """The judge ``cfg`` names: an API model (``kind: openai``), the local model (``kind: local``, labelled
    "local judge"; served through :mod:`lwlib.serve` unless ``serve: false``, empty ``model`` = the profile's), or
    None (``kind: none``). ``profile`` gives the model, device and dtype; ``where`` names the config field in errors
    (``bench.judge``). Close what it returns (``close()``) when it has one."""
    if cfg.kind == "none":
        return None
    if cfg.kind == "openai":
        if not cfg.model:
            raise ValueError(f"{where}.model must name the API judge model (paper: gpt-4o-2024-05-13)")
        return make_backend(cfg, cfg.model, profile.device, profile.dtype)
    if cfg.kind == "local":
        model = cfg.model or profile.model
        if not cfg.serve:
            be = _local_model(cfg, model, profile.device, profile.dtype, name=f"local:{model}")
            be.label = f"local judge ({model})"
            return be
        return LocalJudge(model, profile.device, profile.dtype, cfg.batch_size, cfg.concurrency, cfg.timeout_s,
                          local_backend=_local_model(cfg, model, profile.device, profile.dtype))
    raise ValueError(f"{where}.kind must be 'local', 'openai' or 'none', got {cfg.kind!r}")


def close_judge(backend: Any) -> None:
    """Close a judge built by :func:`make_judge` (a served local judge stops its server)."""
    if backend is not None and hasattr(backend, "close"):
        backend.close()


# ----------------------------------------------------------------------------------------- the loop


@dataclass
class Judged:
    """One record as :func:`judge_records` judged it: the stage's ``record``, the ``result``, the judge's model id
    and label, whether the response was cut for the judge (``truncated``) and whether the cache answered."""

    record: dict[str, Any]
    result: JudgeResult
    judge_model: str
    label: str
    truncated: bool
    cached: bool


def judge_response(response: str, max_words: int | None) -> tuple[str, bool]:
    """The response the judge reads (cut after ``max_words`` words; None = never) and whether it was cut."""
    if max_words is None or count_words(response) <= max_words:
        return response, False
    return truncate_words(response, max_words), True


def judge_records(
    records: Iterable[dict[str, Any]],
    backend: Backend,
    cfg: JudgeConfig,
    store: JsonlStore,
    make_record: Callable[[Judged], dict[str, Any]],
    cache: JudgeCache | None = None,
    seed: int | None = 0,
    desc: str = "judge",
) -> dict[Any, JudgeResult]:
    """Judge every record (``id``, ``prompt``, ``response``) that ``store`` lacks and append
    ``make_record(Judged)`` for it to ``store`` as it is judged; returns the transport errors by id (not stored, so
    a rerun retries them).

    The one judging loop of the stages (the benchmark's judgements, DPO's scores). A record already stored is
    skipped when it was judged by this judge model (its ``judge_model`` field; a record without one is accepted),
    and is an error when another model judged it. The response is cut to ``cfg.max_response_words``
    (:func:`judge_response`); a ``cache`` (:class:`JudgeCache`) answers what this judge model judged before and
    keeps what it judges now. Sampling: ``cfg.max_tokens``, ``cfg.temperature``, ``seed`` (+ the try), up to
    ``cfg.max_tries`` tries (:func:`judge_many`). ``make_record`` must give the record its store key and
    ``judge_model``.
    """
    jid, label = judge_model_id(backend), judge_label(backend)
    todo = []
    for r in records:
        rec = store.get(r["id"])
        if rec is not None:
            if rec.get("judge_model", jid) != jid:
                raise ValueError(f"{store.path}: {r['id']} was judged by {rec['judge_model']!r}, not {jid!r}: "
                                 f"use another run folder or delete the file to rejudge")
            continue
        resp, cut = judge_response(r["response"], cfg.max_response_words)
        hit = cache.get(jid, r["prompt"], resp) if cache is not None else None
        if hit is not None:
            store.append(make_record(Judged(r, hit, jid, label, cut, cached=True)))
        else:
            todo.append((r, resp, cut))
    errors: dict[Any, JudgeResult] = {}
    if todo:
        params = GenParams(cfg.max_tokens, cfg.temperature, seed=seed)
        for i, res in judge_many(backend, [(r["prompt"], resp) for r, resp, _ in todo], cfg.max_tries, params,
                                 desc=desc):
            r, resp, cut = todo[i]
            if res.error:
                errors[r["id"]] = res
                continue
            if cache is not None:
                cache.put(jid, r["prompt"], resp, res)
            store.append(make_record(Judged(r, res, jid, label, cut, cached=False)))
    return errors
