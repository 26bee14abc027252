"""Generation backends: one interface, a local batched transformers backend and an OpenAI-compatible one.

Every stage that generates (probe, AgentWrite, DPO sampling, LongBench-Write predictions, the judge)
takes a :class:`Backend`. Prompts are chat message lists (a plain string means one user message).
``generate_iter`` yields ``(index, Generation)`` as results complete, so stages can write each one to
disk at once; ``generate`` collects them in input order.

Usage::

    be = LocalBackend("smollm2-135m-instruct", batch_size=16)
    gens = be.generate(["Write a 300-word story."], GenParams(max_new_tokens=512, temperature=0.5))
    gens[0].text, gens[0].completion_tokens, gens[0].hit_limit

    be = OpenAIBackend("gpt-4o-2024-05-13", base_url=None, concurrency=8)   # key from $OPENAI_API_KEY

A failed request (after retries) comes back as a ``Generation`` with ``error`` set and is not to be
stored as done, so a resumed stage retries it.
"""

from __future__ import annotations

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

Messages = list[dict[str, str]]


@dataclass
class GenParams:
    """Sampling settings shared by all backends.

    Fields:
        max_new_tokens: token budget per output (the paper: 32768 for open models).
        temperature: 0 means greedy decoding; the paper samples at 0.5.
        top_p: nucleus sampling mass (1.0 = off).
        repetition_penalty: 1.0 = off (local backend only; OpenAI servers ignore it).
        seed: seeds sampling (local backend: once per ``generate`` call; OpenAI: passed through).
        ignore_eos: keep generating past end tokens to exactly ``max_new_tokens`` (throughput benchmarks).
    """

    max_new_tokens: int = 1024
    temperature: float = 0.5
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = 0
    ignore_eos: bool = False


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
        params: GenParams,
        max_new_tokens: Sequence[int] | None = None,
        desc: str | None = None,
    ) -> Iterator[tuple[int, Generation]]: ...

    def generate(
        self,
        prompts: Sequence[Messages | str],
        params: GenParams,
        max_new_tokens: Sequence[int] | None = None,
        desc: str | None = None,
    ) -> list[Generation]: ...


def as_messages(p: Messages | str) -> Messages:
    return [{"role": "user", "content": p}] if isinstance(p, str) else list(p)


class _CollectMixin:
    def generate(self, prompts, params, max_new_tokens=None, desc=None) -> list[Generation]:
        out: list[Generation | None] = [None] * len(prompts)
        for i, g in self.generate_iter(prompts, params, max_new_tokens, desc):
            out[i] = g
        return out  # type: ignore[return-value]


class _PerRowLimit:
    """Stopping criterion: row ``b`` is done once it has ``limits[b]`` new tokens."""

    def __init__(self, prompt_len: int, limits: torch.Tensor):
        self.prompt_len = prompt_len
        self.limits = limits

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return (input_ids.shape[1] - self.prompt_len) >= self.limits


class LocalBackend(_CollectMixin):
    """Batched generation with transformers ``generate`` (left padding, per-item token limits).

    Prompts are sorted by length and cut into batches of ``batch_size``, so each ``generate`` call
    holds prompts of similar length. Generation stops per row at an end-of-turn token or at that row's
    ``max_new_tokens``. ``cache_implementation="static"`` with ``compile=True`` turns on transformers'
    static KV cache and ``torch.compile`` for the decoding step (GPU; see benchmarks/generation.py).
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
    ):
        from .models import end_token_ids, load_model, load_tokenizer

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
        self._lock = threading.Lock()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode(self, p: Messages | str) -> list[int]:
        ids = self.tok.apply_chat_template(as_messages(p), add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in newer transformers
            ids = ids["input_ids"]
        return list(ids)

    def generate_iter(self, prompts, params, max_new_tokens=None, desc=None):
        limits = list(max_new_tokens) if max_new_tokens is not None else [params.max_new_tokens] * len(prompts)
        if len(limits) != len(prompts):
            raise ValueError(f"max_new_tokens has {len(limits)} entries for {len(prompts)} prompts")
        encoded = [self.encode(p) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: (-len(encoded[i]), -limits[i]))
        bar = tqdm(total=len(prompts), desc=desc or f"generate ({self.name})", unit="out", leave=False)
        try:
            with self._lock:
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                for s in range(0, len(order), self.batch_size):
                    idx = order[s : s + self.batch_size]
                    for i, g in zip(idx, self._generate_batch([encoded[i] for i in idx], [limits[i] for i in idx], params)):
                        bar.update(1)
                        yield i, g
        finally:
            bar.close()

    @torch.no_grad()
    def _generate_batch(self, batch: list[list[int]], limits: list[int], params: GenParams) -> list[Generation]:
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
        kwargs: dict[str, Any] = dict(
            max_new_tokens=max(limits),
            eos_token_id=self.end_ids,
            pad_token_id=pad,
            stopping_criteria=[_PerRowLimit(width, lim)] if len(set(limits)) > 1 else None,
        )
        if params.temperature and params.temperature > 0:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if params.ignore_eos:
            kwargs["min_new_tokens"] = max(limits)
        if params.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = params.repetition_penalty
        if self.cache_implementation:
            kwargs["cache_implementation"] = self.cache_implementation
            # On CUDA, transformers compiles the decoding step of a static cache (CUDA graphs) by itself.
            kwargs["disable_compile"] = not self.compile
        out = self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        new = out[:, width:].tolist()
        dt = time.perf_counter() - t0
        gens = []
        for r, toks in enumerate(new):
            toks = toks[: limits[r]]
            end = next((k for k, t in enumerate(toks) if t in self.end_ids), None)
            if end is not None:
                toks, reason = toks[:end], "stop"
            else:
                reason = "length"
            text = self.tok.decode(toks, skip_special_tokens=True)
            n = len(toks) + (1 if reason == "stop" else 0)
            gens.append(Generation(text, len(batch[r]), n, reason, dt / len(batch)))
        return gens


class OpenAIBackend(_CollectMixin):
    """Any OpenAI-compatible chat-completions server (OpenAI, vLLM, SGLang, ``lwlib.serve``).

    Requests run in a bounded thread pool (``concurrency``); each is retried up to ``max_retries``
    times with exponential backoff and jitter on connection errors, timeouts, rate limits and 5xx.
    Token usage comes from the server's ``usage`` field.
    """

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 8,
        max_retries: int = 5,
        timeout_s: float = 600.0,
        backoff_s: float = 1.0,
        name: str | None = None,
    ):
        import openai

        self.model = model
        self.name = name or model
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        key = os.environ.get(api_key_env) or ("EMPTY" if base_url else None)
        if key is None:
            raise ValueError(f"OpenAIBackend: set ${api_key_env} (or give base_url for a local server)")
        self.client = openai.OpenAI(base_url=base_url, api_key=key, timeout=timeout_s, max_retries=0)
        self._retryable = (
            openai.APIConnectionError,  # includes APITimeoutError
            openai.RateLimitError,
            openai.InternalServerError,
        )

    def _one(self, messages: Messages, params: GenParams, max_tokens: int) -> Generation:
        t0 = time.perf_counter()
        err = None
        for attempt in range(self.max_retries + 1):
            try:
                kw: dict[str, Any] = dict(
                    model=self.model, messages=messages, temperature=params.temperature,
                    top_p=params.top_p, max_tokens=max_tokens,
                )
                if params.seed is not None:
                    kw["seed"] = params.seed
                r = self.client.chat.completions.create(**kw)
                ch = r.choices[0]
                usage = r.usage
                return Generation(
                    text=ch.message.content or "",
                    prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
                    completion_tokens=getattr(usage, "completion_tokens", 0) or 0,
                    finish_reason="length" if ch.finish_reason == "length" else "stop",
                    latency_s=time.perf_counter() - t0,
                )
            except self._retryable as e:
                err = f"{type(e).__name__}: {e}"
                if attempt < self.max_retries:
                    time.sleep(self.backoff_s * 2**attempt * (0.5 + random.random()))
            except Exception as e:  # 4xx and the like: retrying will not help
                err = f"{type(e).__name__}: {e}"
                break
        return Generation("", 0, 0, "error", time.perf_counter() - t0, error=err)

    def generate_iter(self, prompts, params, max_new_tokens=None, desc=None):
        limits = list(max_new_tokens) if max_new_tokens is not None else [params.max_new_tokens] * len(prompts)
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futs = {pool.submit(self._one, as_messages(p), params, m): i for i, (p, m) in enumerate(zip(prompts, limits))}
            for f in tqdm(as_completed(futs), total=len(futs), desc=desc or f"api ({self.name})", leave=False):
                yield futs[f], f.result()


@dataclass
class BackendConfig:
    """Which backend a stage uses.

    Fields:
        kind: ``local`` (transformers, batched) or ``openai`` (any OpenAI-compatible server).
        model: model name/path (local) or served model id (openai); empty = the profile's model.
        batch_size: prompts per ``generate`` call (local).
        cache_implementation: ``static`` for a static KV cache (local, GPU), or null.
        compile: torch.compile the decoding step (local, with a static cache).
        base_url: server URL (openai); null = api.openai.com.
        api_key_env: environment variable holding the API key (openai).
        concurrency: requests in flight (openai).
        max_retries: retries per request with exponential backoff (openai).
        timeout_s: per-request timeout in seconds (openai).
    """

    kind: Literal["local", "openai"] = "local"
    model: str = ""
    batch_size: int = 8
    cache_implementation: str | None = None
    compile: bool = False
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 8
    max_retries: int = 5
    timeout_s: float = 600.0
    extra: dict[str, Any] = field(default_factory=dict)


def make_backend(cfg: BackendConfig, default_model: str = "", device: str = "auto", dtype: str = "auto") -> Backend:
    """Build the backend a :class:`BackendConfig` describes."""
    model = cfg.model or default_model
    if cfg.kind == "local":
        return LocalBackend(
            model, batch_size=cfg.batch_size, device=device, dtype=dtype,
            cache_implementation=cfg.cache_implementation, compile=cfg.compile,
        )
    if cfg.kind == "openai":
        return OpenAIBackend(
            model, base_url=cfg.base_url, api_key_env=cfg.api_key_env, concurrency=cfg.concurrency,
            max_retries=cfg.max_retries, timeout_s=cfg.timeout_s,
        )
    raise ValueError(f"backend kind must be 'local' or 'openai', got {cfg.kind!r}")
