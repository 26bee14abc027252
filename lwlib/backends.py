"""Generation backends: one interface, a local batched transformers backend and an OpenAI-compatible one.

Every stage that generates (probe, AgentWrite, DPO sampling, LongBench-Write predictions, the judge)
takes a :class:`Backend`. Prompts are chat message lists (a plain string means one user message).
``generate_iter`` yields ``(index, Generation)`` as results complete, so stages can write each one to
disk at once; ``generate`` collects them in input order.

Usage::

    be = LocalBackend("smollm2-135m-instruct", batch_size=16)
    gens = be.generate(["Write a 300-word story."], GenParams(max_new_tokens=512, temperature=0.5))
    gens[0].text, gens[0].completion_tokens, gens[0].hit_limit

    be = LocalBackend("smollm2-135m-instruct", engine="slots")        # continuous batching, CUDA graphs
    p = GenParams(max_new_tokens=4096, repetition_penalty=1.2, repetition_window=64)   # loop-free decoding

    be = OpenAIBackend("gpt-4o-2024-05-13", base_url=None, concurrency=8)   # key from $OPENAI_API_KEY

A failed request (after retries) comes back as a ``Generation`` with ``error`` set and is not to be
stored as done, so a resumed stage retries it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from .progress import tqdm
from .typed import check_sizes

Messages = list[dict[str, str]]


@dataclass
class GenParams:
    """Sampling settings shared by all backends.

    Fields:
        max_new_tokens: token budget per output (the paper: 32768 for open models).
        temperature: 0 means greedy decoding; the paper samples at 0.5.
        top_p: nucleus sampling mass (1.0 = off).
        repetition_penalty: 1.0 = off. Local backend (both engines, :class:`lwlib.sampling.GenerationPenalty`):
            penalizes only tokens that occur in the generated text, never the prompt and never end tokens
            (a positive logit is divided by it, a negative one multiplied: the CTRL rule). Unlike
            transformers' own processor, which penalizes the prompt's end-of-turn token so that the model
            can hardly stop. OpenAI servers ignore it.
        seed: seeds sampling (local backend: once per ``generate`` call; OpenAI: passed through).
        ignore_eos: keep generating past end tokens to exactly ``max_new_tokens`` (throughput benchmarks).
        repetition_window: penalize only tokens among the last N generated tokens (0 = all generated
            tokens); with a penalty this is a "loop-free" decoding for small models that repeat themselves.
        no_repeat_ngram_size: n > 0 forbids any n-gram of the generated text to occur twice (end tokens
            excepted); 0 = off. Local backend only.
        sample: which output of its prompt a row is (several samples of one prompt: the probe's, DPO's,
            LongBench-Write's). An API request is seeded with :func:`request_seed` (``seed`` plus a stride per
            sample), so that a server that seeds each request (vLLM, ``lwlib.serve``) gives the samples of a prompt
            different outputs instead of one output k times; the local engines draw all rows of a call from one
            seeded generator and need no more than that.
    """

    max_new_tokens: int = 1024
    temperature: float = 0.5
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = 0
    ignore_eos: bool = False
    repetition_window: int = 0
    no_repeat_ngram_size: int = 0
    sample: int = 0

    def __post_init__(self):
        if not self.repetition_penalty > 0:
            raise ValueError(f"GenParams.repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.repetition_window < 0:
            raise ValueError(f"GenParams.repetition_window must be >= 0, got {self.repetition_window}")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"GenParams.no_repeat_ngram_size must be >= 0, got {self.no_repeat_ngram_size}")
        if self.sample < 0:
            raise ValueError(f"GenParams.sample must be >= 0, got {self.sample}")


SAMPLE_SEED_STRIDE = 100_003  # apart from the seed indices of a profile's runs (seed + k)


def request_seed(params: GenParams) -> int | None:
    """The seed an API request carries: ``seed + SAMPLE_SEED_STRIDE * sample`` (None: unseeded).

    Usage: ``request_seed(GenParams(seed=3, sample=1)) == 100_006``
    """
    return None if params.seed is None else params.seed + SAMPLE_SEED_STRIDE * params.sample


def samples_params(params: GenParams, n: int) -> list[GenParams]:
    """``n`` copies of ``params``, sample ``k`` marked ``k`` (:attr:`GenParams.sample`): the settings of a prompt's
    ``n`` samples.

    Usage: ``ps = samples_params(dec.params(4096), 4)  # Job(..., ps[k], ...) for sample k``
    """
    return [params if k == 0 else dataclasses.replace(params, sample=k) for k in range(n)]


@dataclass
class Generation:
    """One output. ``finish_reason``: ``stop`` (end token), ``length`` (token limit) or ``error``."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"
    latency_s: float = 0.0
    error: str | None = None

    @property
    def hit_limit(self) -> bool:
        return self.finish_reason == "length"

    def as_record(self) -> dict[str, Any]:
        return {
            "response": self.text,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "finish_reason": self.finish_reason,
            "hit_limit": self.hit_limit,
            "latency_s": round(self.latency_s, 3),
        }


class Backend(Protocol):
    """What stages need from a generator."""

    name: str

    def generate_iter(
        self,
        prompts: Sequence[Messages | str],
        params: GenParams | Sequence[GenParams],
        max_new_tokens: Sequence[int] | None = None,
        desc: str | None = None,
    ) -> Iterator[tuple[int, Generation]]: ...

    def generate(
        self,
        prompts: Sequence[Messages | str],
        params: GenParams | Sequence[GenParams],
        max_new_tokens: Sequence[int] | None = None,
        desc: str | None = None,
    ) -> list[Generation]: ...


def row_params(params: GenParams | Sequence[GenParams], n: int) -> list[GenParams]:
    """One :class:`GenParams` per prompt: ``params`` repeated, or the given per-prompt list (checked)."""
    if isinstance(params, GenParams):
        return [params] * n
    out = list(params)
    if len(out) != n:
        raise ValueError(f"{len(out)} sampling settings (GenParams) for {n} prompts")
    return out


def _groups(keys: Sequence[Any]) -> list[list[int]]:
    """Indices grouped by equal key, groups in order of first appearance."""
    out: dict[Any, list[int]] = {}
    for i, k in enumerate(keys):
        out.setdefault(k, []).append(i)
    return list(out.values())


def as_messages(p: Messages | str) -> Messages:
    return [{"role": "user", "content": p}] if isinstance(p, str) else list(p)


class _CollectMixin:
    def generate(self, prompts, params, max_new_tokens=None, desc=None) -> list[Generation]:
        out: list[Generation | None] = [None] * len(prompts)
        for i, g in self.generate_iter(prompts, params, max_new_tokens, desc):
            out[i] = g
        return out  # type: ignore[return-value]


class GenerationStopped(Exception):
    """Raised by :meth:`LocalBackend.generate_iter` when its ``stop`` event was set: the outputs not yet yielded
    were dropped part-way (``lwlib.serve`` stops the generation of a client that went away, or at shutdown)."""


class _StopWhenSet:
    """Stopping criterion: every row is done once ``event`` is set (checked after each decoding step)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _PerRowLimit:
    """Stopping criterion: row ``b`` is done once it has ``limits[b]`` new tokens."""

    def __init__(self, prompt_len: int, limits: torch.Tensor):
        self.prompt_len = prompt_len
        self.limits = limits

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return (input_ids.shape[1] - self.prompt_len) >= self.limits


def compile_cache_dir() -> str:
    """Where torch.compile (inductor) keeps its compiled artifacts between runs: ``$TORCHINDUCTOR_CACHE_DIR``,
    set to ``<lwlib cache>/inductor`` (``~/.cache/lwlib/inductor``) when unset (:func:`lwlib.runs.compile_caches`,
    which every stage manifest records).

    Usage: ``compile_cache_dir()``
    """
    from .runs import compile_caches

    return compile_caches()["inductor"]


ENGINES = ("generate", "slots")


class LocalBackend(_CollectMixin):
    """Batched local generation with transformers models; two engines, the same outputs under greedy decoding.

    ``engine="generate"``: prompts sorted by length, cut into batches of ``batch_size``, one transformers
    ``generate`` call per batch (left padding, per-row token limits; ``cache_implementation="static"`` with
    ``compile=True`` turns on transformers' static KV cache and ``torch.compile``). A batch decodes until its
    longest row is done.

    ``engine="slots"`` (:class:`lwlib.decoding.SlotEngine`): continuous batching over a static KV cache of
    ``max_batch`` slots; finished rows leave (and are yielded) at once and pending prompts take their slots;
    decoding steps run at fixed (batch, cache length) buckets, one CUDA graph each on CUDA, so nothing
    recompiles from call to call. Generation stops per row at an end-of-turn token or at that row's
    ``max_new_tokens`` in both engines. transformers' own continuous batching was measured against it on the
    stages' shapes and was many times slower on the H200 (benchmarks/README.md, "transformers' continuous batching
    against the slots engine"); it is not an engine here.
    """

    def __init__(
        self,
        model: str | Any = "smollm2-135m-instruct",
        tokenizer: Any = None,
        batch_size: int = 8,
        device: str = "auto",
        dtype: str = "auto",
        cache_implementation: str | None = None,
        compile: bool = False,
        name: str | None = None,
        engine: str = "generate",
        segment_tokens: int = 32,
        max_batch: int | None = None,
        batch_buckets: Sequence[int] | None = None,
        cache_buckets: Sequence[int] | None = None,
        prefill_tokens: int = 32768,
        kv_cache_gb: float | None = None,
        cuda_graphs: bool = True,
        attention: str = "auto",
        fused_kernels: str = "auto",
    ):
        from .models import end_token_ids, load_model, load_tokenizer

        if engine not in ENGINES:
            raise ValueError(f"LocalBackend: engine must be one of {ENGINES}, got {engine!r}")
        if compile:
            compile_cache_dir()  # before the first compilation, so inductor's artifacts persist between runs
        if isinstance(model, (str, os.PathLike)):
            self.name = name or str(model)
            self.model, self.tok = load_model(model, device=device, dtype=dtype)
        else:
            self.name = name or getattr(model.config, "_name_or_path", "model")
            self.model = model
            self.tok = tokenizer if tokenizer is not None else load_tokenizer(self.name)
        self.tok.padding_side = "left"
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
        self.end_ids = end_token_ids(self.tok)
        self.batch_size = batch_size
        self.cache_implementation = cache_implementation
        self.compile = compile
        self.engine = engine
        self.max_batch = max_batch
        self._slots = None
        if engine == "slots":
            from .decoding import SlotConfig, SlotEngine

            self._slots = SlotEngine(self.model, self.end_ids, self.tok.pad_token_id, SlotConfig(
                max_batch=max_batch, batch_buckets=list(batch_buckets) if batch_buckets else None,
                cache_buckets=list(cache_buckets) if cache_buckets else None, segment_tokens=segment_tokens,
                prefill_tokens=prefill_tokens, kv_cache_gb=kv_cache_gb, cuda_graphs=cuda_graphs,
                attention=attention, fused_kernels=fused_kernels))
        self._lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def context_length(self) -> int | None:
        """The model's context in tokens (prompt + output), from its config; None if it states none."""
        n = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        return int(n) if isinstance(n, int) and n > 0 else None

    @property
    def slot_engine(self):
        """The :class:`lwlib.decoding.SlotEngine` (``engine="slots"``; its ``stats``), else None."""
        return self._slots

    def encode(self, p: Messages | str) -> list[int]:
        ids = self.tok.apply_chat_template(as_messages(p), add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in newer transformers
            ids = ids["input_ids"]
        return list(ids)

    def generate_iter(self, prompts, params, max_new_tokens=None, desc=None, stop: threading.Event | None = None):
        """Yields ``(index, Generation)`` as outputs finish. ``params``: one :class:`GenParams` or one per
        prompt (rows of several decodings: the slots engine decodes them in one batch, each row with its own
        temperature and penalty; ``generate`` runs one group of equal settings after another). ``stop``: once
        this event is set, decoding ends after the current step (``generate``) or segment (``slots``) and
        :class:`GenerationStopped` is raised; nothing unfinished is yielded."""
        plist = row_params(params, len(prompts))
        limits = list(max_new_tokens) if max_new_tokens is not None else [p.max_new_tokens for p in plist]
        if len(limits) != len(prompts):
            raise ValueError(f"max_new_tokens has {len(limits)} entries for {len(prompts)} prompts")
        encoded = [self.encode(p) for p in prompts]
        bar = tqdm(total=len(prompts), desc=desc or f"generate ({self.name})", unit="out", leave=False)
        try:
            with self._lock:
                if self._slots:
                    it = self._iter_slots(encoded, limits, plist, stop)
                else:
                    it = self._iter_generate(encoded, limits, plist, stop)
                for i, g in it:
                    bar.update(1)
                    yield i, g
                if stop is not None and stop.is_set():  # the slots engine returns early without a word
                    raise GenerationStopped(f"{self.name}: generation stopped")
        finally:
            bar.close()

    def _iter_slots(self, encoded, limits, plist, stop=None):
        from .sampling import shared_key

        eng = self._slots
        if self.max_batch is None:  # follow batch_size on CPU (benchmarks change it); CUDA: sized from memory
            eng.cfg.max_batch = None if self.device.type == "cuda" else self.batch_size
        for grp in _groups([shared_key(p) for p in plist]):
            for j, toks, ended, seconds in eng.run([encoded[i] for i in grp], [limits[i] for i in grp],
                                                   [plist[i] for i in grp], stop=stop):
                i = grp[j]
                yield i, self._finish(encoded[i], toks, limits[i], seconds)

    def _iter_generate(self, encoded, limits, plist, stop=None):
        for grp in _groups([dataclasses.astuple(dataclasses.replace(p, sample=0)) for p in plist]):  # samples alike
            params = plist[grp[0]]
            order = sorted(grp, key=lambda i: (-len(encoded[i]), -limits[i]))
            if params.seed is not None:
                torch.manual_seed(params.seed)
            for s in range(0, len(order), self.batch_size):
                idx = order[s : s + self.batch_size]
                gens = self._generate_batch([encoded[i] for i in idx], [limits[i] for i in idx], params, stop)
                if stop is not None and stop.is_set():  # cut short by the event: not outputs
                    raise GenerationStopped(f"{self.name}: generation stopped")
                yield from zip(idx, gens)

    def _finish(self, prompt: list[int], toks: list[int], limit: int, seconds: float) -> Generation:
        """A ``Generation`` from a row's generated ids: cut at the first end token ("stop", which counts as a
        completion token) or at ``limit`` ("length")."""
        toks = toks[:limit]
        end = next((k for k, t in enumerate(toks) if t in self.end_ids), None)
        if end is not None:
            toks, reason = toks[:end], "stop"
        else:
            reason = "length"
        text = self.tok.decode(toks, skip_special_tokens=True)
        n = len(toks) + (1 if reason == "stop" else 0)
        return Generation(text, len(prompt), n, reason, seconds)

    @torch.no_grad()
    def _generate_batch(self, batch: list[list[int]], limits: list[int], params: GenParams,
                        stop: threading.Event | None = None) -> list[Generation]:
        from transformers import LogitsProcessorList

        from .sampling import GenerationPenalty

        t0 = time.perf_counter()
        pad = self.tok.pad_token_id
        width = max(len(x) for x in batch)
        if self.cache_implementation == "static":  # fewer distinct shapes -> fewer recompilations
            width = -(-width // 64) * 64
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, x in enumerate(batch):
            ids[r, width - len(x) :] = torch.tensor(x)
            mask[r, width - len(x) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        lim = torch.tensor(limits, device=self.device)
        criteria = [_PerRowLimit(width, lim)] if len(set(limits)) > 1 else []
        if stop is not None:
            criteria.append(_StopWhenSet(stop))
        kwargs: dict[str, Any] = dict(
            max_new_tokens=max(limits),
            eos_token_id=self.end_ids,
            pad_token_id=pad,
            stopping_criteria=criteria or None,
        )
        if params.temperature and params.temperature > 0:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if params.ignore_eos:
            kwargs["min_new_tokens"] = max(limits)
        pen = GenerationPenalty.from_params(params, self.end_ids)
        if pen.active:  # generated text only, never end tokens (not transformers' repetition_penalty)
            kwargs["logits_processor"] = LogitsProcessorList([pen.for_generate(width)])
        if self.cache_implementation:
            kwargs["cache_implementation"] = self.cache_implementation
            # On CUDA, transformers compiles the decoding step of a static cache (CUDA graphs) by itself.
            kwargs["disable_compile"] = not self.compile
        out = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        new = out[:, width:].tolist()
        dt = time.perf_counter() - t0
        return [self._finish(batch[r], toks, limits[r], dt / len(batch)) for r, toks in enumerate(new)]


class RequestCancelled(Exception):
    """Raised inside a request thread (before anything is sent) once its ``generate_iter`` call was
    interrupted or passed its deadline; the request then comes back as an error."""


class MalformedResponse(Exception):
    """A 200 answer that is not a chat completion (not JSON, no choices): a transient server fault."""


class OpenAIBackend(_CollectMixin):
    """Any OpenAI-compatible chat-completions server (OpenAI, vLLM, SGLang, ``lwlib.serve``).

    Requests run in a bounded thread pool (``concurrency``). Transport faults (connection errors,
    timeouts, 408/409/429/5xx) are retried by the OpenAI SDK itself, ``max_retries`` times with jittered
    exponential backoff, honouring ``Retry-After``; a 200 answer that is not a chat completion (malformed
    JSON) is retried here as often, then recorded as an error. Each request's timeout is ``timeout_s`` or,
    when that is None, ``timeout_base_s + max_tokens / min_tokens_per_s`` (long generations are long).
    ``deadline_s`` bounds one ``generate_iter`` call: after it, requests not yet sent are not sent and
    come back as errors (stages do not store errors, so a rerun retries them), and no request waits past
    it. An interrupt (KeyboardInterrupt, or the consumer stopping) cancels queued requests and no attempt
    starts after it; requests already on the wire finish in the background, unretried.
    Token usage comes from the server's ``usage`` field.

    Usage: ``OpenAIBackend("gpt-4o-2024-05-13", concurrency=8, deadline_s=3600)``
    """

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 8,
        max_retries: int = 5,
        timeout_s: float | None = None,
        backoff_s: float = 0.5,
        name: str | None = None,
        timeout_base_s: float = 60.0,
        min_tokens_per_s: float = 10.0,
        deadline_s: float | None = None,
    ):
        import openai

        self.model = model
        self.name = name or model
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.timeout_s = timeout_s
        self.timeout_base_s = timeout_base_s
        self.min_tokens_per_s = min_tokens_per_s
        self.deadline_s = deadline_s
        key = os.environ.get(api_key_env) or ("EMPTY" if base_url else None)
        if key is None:
            raise ValueError(f"OpenAIBackend: set ${api_key_env} (or give base_url for a local server)")
        self._local = threading.local()  # the stop event and deadline of the request this thread sends
        http = openai.DefaultHttpxClient(event_hooks={"request": [self._before_send]})
        self.client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=max_retries, http_client=http,
                                    timeout=timeout_s if timeout_s is not None else self.request_timeout(1024))
        self._malformed = (json.JSONDecodeError, openai.APIResponseValidationError, MalformedResponse)

    def request_timeout(self, max_tokens: int) -> float:
        """Seconds one request may take: ``timeout_s`` if set, else ``timeout_base_s + max_tokens / min_tokens_per_s``."""
        if self.timeout_s is not None:
            return float(self.timeout_s)
        return self.timeout_base_s + max_tokens / self.min_tokens_per_s

    def _before_send(self, request: Any) -> None:
        """httpx hook run before every attempt, the SDK's retries included."""
        stop, deadline = getattr(self._local, "stop", None), getattr(self._local, "deadline", None)
        if stop is not None and stop.is_set():
            raise RequestCancelled("interrupted: not sent")
        if deadline is not None and time.monotonic() >= deadline:
            raise RequestCancelled(f"deadline of {self.deadline_s} s passed: not sent")

    def _one(self, messages: Messages, params: GenParams, max_tokens: int,
             stop: threading.Event | None = None, deadline: float | None = None) -> Generation:
        t0 = time.perf_counter()
        self._local.stop, self._local.deadline = stop, deadline
        err = None
        try:
            for attempt in range(self.max_retries + 1):
                timeout = self.request_timeout(max_tokens)
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        err = err or f"RequestCancelled: deadline of {self.deadline_s} s passed: not sent"
                        break
                    timeout = min(timeout, left)
                kw: dict[str, Any] = dict(
                    model=self.model, messages=messages, temperature=params.temperature,
                    top_p=params.top_p, max_tokens=max_tokens, timeout=timeout,
                )
                if params.seed is not None:
                    kw["seed"] = request_seed(params)  # the samples of one prompt: different seeds
                try:
                    r = self.client.chat.completions.create(**kw)
                    ch = r.choices[0] if isinstance(getattr(r, "choices", None), list) and r.choices else None
                    if ch is None or getattr(ch, "message", None) is None:
                        raise MalformedResponse(f"not a chat completion: {str(r)[:200]!r}")
                    usage = r.usage
                    return Generation(
                        text=ch.message.content or "",
                        prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
                        completion_tokens=getattr(usage, "completion_tokens", 0) or 0,
                        finish_reason="length" if ch.finish_reason == "length" else "stop",
                        latency_s=time.perf_counter() - t0,
                    )
                except self._malformed as e:  # transient server fault: retried like a 500
                    err = f"{type(e).__name__}: {e}"
                    if attempt < self.max_retries:
                        delay = min(self.backoff_s * 2**attempt, 8.0) * (1 - 0.25 * random.random())
                        if stop is None:
                            time.sleep(delay)
                        elif stop.wait(delay):  # interrupted while waiting: no further attempt
                            break
                except Exception as e:  # transport errors after the SDK's retries, 4xx, cancellation
                    err = f"{type(e).__name__}: {e}"
                    break
        finally:
            self._local.stop = self._local.deadline = None
        return Generation("", 0, 0, "error", time.perf_counter() - t0, error=err)

    def generate_iter(self, prompts, params, max_new_tokens=None, desc=None):
        plist = row_params(params, len(prompts))
        limits = list(max_new_tokens) if max_new_tokens is not None else [p.max_new_tokens for p in plist]
        if len(limits) != len(prompts):
            raise ValueError(f"max_new_tokens has {len(limits)} entries for {len(prompts)} prompts")
        stop = threading.Event()
        deadline = time.monotonic() + self.deadline_s if self.deadline_s is not None else None
        pool = ThreadPoolExecutor(max_workers=self.concurrency)
        try:
            futs = {pool.submit(self._one, as_messages(p), pp, m, stop, deadline): i
                    for i, (p, pp, m) in enumerate(zip(prompts, plist, limits))}
            for f in tqdm(as_completed(futs), total=len(futs), desc=desc or f"api ({self.name})", leave=False):
                yield futs[f], f.result()
        finally:  # normal end, KeyboardInterrupt, or the consumer closing the generator
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)



class ServedBackend(OpenAIBackend):
    """:class:`OpenAIBackend` on an inference server this object starts for ``model`` (``backend.kind: server``)
    and stops in :meth:`close`: the process is a :class:`lwlib.served.ServerProcess` (``command``: vLLM's by
    default; its output in ``log_path``, named in errors; up to ``ready_timeout_s`` to answer). Other keyword
    arguments go to :class:`OpenAIBackend`.

    Usage: ``be = ServedBackend("runs/paper/sft/model", command=VLLM_COMMAND); ...; be.close()``
    """

    def __init__(self, model: str, command: Sequence[str] | None = None, ready_timeout_s: float = 1800.0,
                 log_path: str | os.PathLike | None = None, env: dict[str, str] | None = None, **kwargs: Any):
        from .served import VLLM_COMMAND, ServerProcess

        self.server = ServerProcess(model, command or VLLM_COMMAND, ready_timeout_s, log_path, env)
        try:
            super().__init__(model, base_url=self.server.base_url, **kwargs)
        except BaseException:
            self.server.close()
            raise

    @property
    def proc(self):
        """The server's ``subprocess.Popen``."""
        return self.server.proc

    @property
    def log_path(self):
        return self.server.log_path

    @property
    def running(self) -> bool:
        return self.server.running

    def close(self, grace_s: float = 30.0) -> None:
        """Stop the server (SIGTERM to its process group, SIGKILL after ``grace_s``); idempotent."""
        self.server.close(grace_s)


@dataclass
class BackendConfig:
    """Which backend a stage uses.

    Fields:
        kind: ``local`` (transformers, batched), ``openai`` (any OpenAI-compatible server) or ``server`` (an
            inference server started for the stage's model, used as ``openai`` and stopped afterwards:
            :mod:`lwlib.served`; vLLM by default).
        model: model name/path (local, server) or served model id (openai); empty = the profile's model.
        device: local: where the model runs (``cpu``, ``cuda``, ``auto``); null = the profile's ``device``.
        dtype: local: the model's dtype (``float32``, ``bfloat16``, ``auto``); null = the profile's ``dtype``.
        batch_size: prompts per ``generate`` call (local).
        cache_implementation: ``static`` for a static KV cache (local, GPU), or null.
        compile: torch.compile the decoding step (local, with a static cache).
        base_url: server URL (openai); null = api.openai.com.
        api_key_env: environment variable holding the API key (openai).
        concurrency: requests in flight (openai).
        max_retries: retries per request (openai): the SDK's, on connection errors, timeouts, 408/409/429/5xx,
            with jittered exponential backoff and Retry-After; and as many on malformed (non-JSON) answers.
        timeout_s: fixed per-request timeout in seconds (openai); null = derived from the request's token
            budget: ``timeout_base_s + max_tokens / min_tokens_per_s``.
        timeout_base_s: the fixed part of the derived per-request timeout (openai; connection, queueing, prefill).
        min_tokens_per_s: the slowest generation speed still waited for (openai): a 32,768-token request
            may take 60 + 3,277 s with the defaults.
        deadline_s: bound on one stage call (openai; seconds, null = none): after it, requests not yet sent
            come back as errors (not stored: a rerun retries them) and none waits past it.
        engine: local decoding engine: ``generate`` (transformers ``generate`` per batch) or ``slots``
            (continuous batching over a static KV cache, CUDA graphs per shape bucket; lwlib.decoding).
        segment_tokens: slots: decoding steps between two looks at the rows (finished rows leave, pending
            prompts take their slots, buckets are re-chosen).
        max_batch: slots: number of slots (the largest batch); null = 256 on CUDA (lowered to what
            ``kv_cache_gb`` holds), ``batch_size`` on CPU.
        batch_buckets: slots: the smaller batch sizes decoded at; null = 8, 16, 32, ...
        cache_buckets: slots: KV-cache lengths decoded at; null = 512, 1024, ... up to the model's context.
        prefill_tokens: slots: padded prompt tokens per prefill forward.
        kv_cache_gb: slots: memory for the KV cache; null = 60% of free GPU memory (CPU: 4 GB).
        cuda_graphs: slots: one CUDA graph per (batch, cache) bucket on CUDA; false = eager steps.
        attention: slots: decoding attention, ``triton`` (a split-K kernel reading each row's own context:
            lwlib.decode_attention), ``sdpa`` (PyTorch's over the cache bucket, length-masked) or ``auto``
            (``triton`` on CUDA where Triton is installed).
        fused_kernels: slots: ``liger`` (Liger-Kernel's fused RMSNorm, SwiGLU and RoPE in the engine's passes:
            fewer kernels per decoding step; the llama family), ``exact`` (the engine's own bit-exact kernels: Gemma
            3's norms and RoPE, lwlib.decode_norm and lwlib.decode_rope), ``none``, or ``auto`` (on CUDA: ``exact``
            for Gemma 3, ``liger`` for the llama family where liger-kernel is installed).
        server_command: server: the command that serves ``{model}`` on ``{port}`` with ``{gpus}`` GPUs (``{python}``:
            this interpreter); null = ``lwlib.served.VLLM_COMMAND`` (``vllm serve``; ``lwlib.served.SGLANG_COMMAND``
            for SGLang, ``lwlib.served.LWLIB_SERVE_COMMAND`` for ``lwlib.serve``).
        server_ready_s: server: seconds to wait for the server to answer (loading an 8B model takes minutes).
        server_log: server: file for the server's output; null = a temporary file (named in errors).
    """

    kind: Literal["local", "openai", "server"] = "local"
    model: str = ""
    device: str | None = None
    dtype: str | None = None
    batch_size: int = 8
    cache_implementation: str | None = None
    compile: bool = False
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    max_retries: int = 5
    timeout_s: float | None = None
    timeout_base_s: float = 60.0
    min_tokens_per_s: float = 10.0
    deadline_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # local engine (lwlib.decoding)
    engine: str = "generate"
    segment_tokens: int = 32
    max_batch: int | None = None
    batch_buckets: list[int] | None = None
    cache_buckets: list[int] | None = None
    prefill_tokens: int = 32768
    kv_cache_gb: float | None = None
    cuda_graphs: bool = True
    attention: str = "auto"
    fused_kernels: str = "auto"
    # server (lwlib.served)
    server_command: list[str] | None = None
    server_ready_s: float = 1800.0
    server_log: str | None = None

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ValueError(f"backend.engine must be one of {ENGINES}, got {self.engine!r}")
        check_sizes(self, "backend", 1, "batch_size", "concurrency", "segment_tokens", "max_batch", "batch_buckets",
                    "cache_buckets", "prefill_tokens")
        check_sizes(self, "backend", 0, "max_retries", "timeout_s", "timeout_base_s", "deadline_s", "kv_cache_gb",
                    "server_ready_s")
        if not self.min_tokens_per_s > 0:
            raise ValueError(f"backend.min_tokens_per_s must be > 0, got {self.min_tokens_per_s}")


def release(backend: Any) -> None:
    """Drop a local backend's model, KV cache and CUDA graphs now (a training step may need the memory next);
    stop a started server (``kind: server``)."""
    if backend is None:
        return
    if isinstance(backend, ServedBackend):
        backend.close()
        return
    for attr in ("_slots", "model"):
        if hasattr(backend, attr):
            setattr(backend, attr, None)
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def make_backend(cfg: BackendConfig, default_model: str = "", device: str = "auto", dtype: str = "auto") -> Backend:
    """Build the backend a :class:`BackendConfig` describes."""
    model = cfg.model or default_model
    if cfg.kind == "local":
        return LocalBackend(
            model, batch_size=cfg.batch_size, device=cfg.device or device, dtype=cfg.dtype or dtype,
            cache_implementation=cfg.cache_implementation, compile=cfg.compile, engine=cfg.engine,
            segment_tokens=cfg.segment_tokens, max_batch=cfg.max_batch, batch_buckets=cfg.batch_buckets,
            cache_buckets=cfg.cache_buckets, prefill_tokens=cfg.prefill_tokens, kv_cache_gb=cfg.kv_cache_gb,
            cuda_graphs=cfg.cuda_graphs, attention=cfg.attention, fused_kernels=cfg.fused_kernels,
        )
    if cfg.kind == "openai":
        return OpenAIBackend(
            model, base_url=cfg.base_url, api_key_env=cfg.api_key_env, concurrency=cfg.concurrency,
            max_retries=cfg.max_retries, timeout_s=cfg.timeout_s, timeout_base_s=cfg.timeout_base_s,
            min_tokens_per_s=cfg.min_tokens_per_s, deadline_s=cfg.deadline_s,
        )
    if cfg.kind == "server":
        return ServedBackend(
            model, command=cfg.server_command, ready_timeout_s=cfg.server_ready_s,
            log_path=cfg.server_log, concurrency=cfg.concurrency, max_retries=cfg.max_retries, timeout_s=cfg.timeout_s,
            timeout_base_s=cfg.timeout_base_s, min_tokens_per_s=cfg.min_tokens_per_s, deadline_s=cfg.deadline_s,
        )
    raise ValueError(f"backend kind must be 'local', 'openai' or 'server', got {cfg.kind!r}")
