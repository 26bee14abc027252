"""A small OpenAI-compatible chat-completions server on loopback, answering with a local backend.

It lets every API path (AgentWrite with an API model, the LongBench-Write judge, DPO scoring) run
for real without network access: tests use it as a fixture, and the smoke/gpu profiles use it as the
"local judge" when no API model is configured. It speaks ``POST /v1/chat/completions`` (non-streaming),
``GET /v1/models`` and ``GET /health`` (``{"status", "generating", "waiting", "max_queue"}``).

Requests:

- A bad request gets a 4xx with an OpenAI-style body, ``{"error": {"message", "type", "param", "code"}}``,
  ``param`` naming the field: a body that is not a JSON object, a message without ``content``, a
  ``temperature``, ``top_p``, ``seed`` or ``max_tokens`` of the wrong type or range (``max_tokens`` >= 1:
  0 is an error, not "the default"), ``n`` other than 1, ``stream: true``, a missing or negative
  ``Content-Length`` (411/400), a body over ``max_body_bytes`` (413).
- Prompt tokens + ``max_tokens`` beyond the model's context is a 400 (``context_length_exceeded``) for a
  backend that tells its context (:class:`lwlib.backends.LocalBackend`); without ``max_tokens`` the budget is
  :data:`DEFAULT_MAX_TOKENS`, cut to what the context leaves. ``ignore_eos: true`` (as vLLM) generates to the
  budget.
- Requests are generated one at a time, in arrival order, each its own ``generate`` call (an answer does not
  depend on which other requests were waiting); up to ``max_queue`` wait, and one beyond that is refused at once
  with 429 and ``Retry-After`` (the OpenAI client retries it), never dropped.
- A client that disconnects leaves the queue, or has its generation stopped (backends whose ``generate_iter``
  takes ``stop``: the local backend stops after the current decoding step).

Fault injection for tests: ``fail_first`` answers the first N requests with HTTP 500, ``malformed_first``
answers the next N with HTTP 200 and a body that is not JSON, and ``delay_s`` waits before queueing a request
(to exercise client timeouts and interrupts; a request still waiting when the server closes is dropped
unanswered). ``requests`` counts the valid chat requests received, ``rejected`` the 429s, ``cancelled`` the
requests whose client went away before the answer.

Usage::

    with serve(LocalBackend("smollm2-135m-instruct")) as server:
        be = OpenAIBackend(server.model, base_url=server.url)

    python -m lwlib.serve                                   # the bundled model on http://127.0.0.1:8000/v1
    python -m lwlib.serve --model runs/gpu/sft/model --port 8001 --model-name longwriter-sft --max-queue 16
    python -m lwlib.serve --port 8001 --engine slots --kv-cache-gb 2      # GPU: the slots engine, a 2 GB KV cache

From the command line it serves until SIGINT (Ctrl-C) or SIGTERM, for other tools (an OpenAI client, a chat UI,
``bench.judge.kind: openai`` with ``base_url``); it installs its own handlers for both, so it stops also when
started with SIGINT ignored (a background job of a non-interactive shell), and it stops within a few seconds
whatever it is doing: the generation in progress is stopped, waiting requests get 503. A second signal exits at
once.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import select
import signal
import socket
import sys
import threading
import time
import uuid
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

from .backends import Backend, Generation, GenerationStopped, GenParams

DEFAULT_MAX_TOKENS = 512  # a request without max_tokens (cut to what the model's context leaves)
MAX_BODY_BYTES = 32 << 20  # a larger body is refused (413)
DEFAULT_MAX_QUEUE = 64  # requests waiting behind the one being generated; more are refused (429)
STOP_GRACE_S = 10.0  # python -m lwlib.serve: how long a stopping server waits for the generation to end
ROLES = ("system", "developer", "user", "assistant", "tool")


class RequestError(Exception):
    """A request answered with an error: ``status`` (4xx/5xx) and the OpenAI-style error body's fields."""

    def __init__(self, status: int, message: str, param: str | None = None, type: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ChatRequest:
    """A validated chat-completions request: ``max_tokens`` None = not given."""

    messages: list[dict[str, str]]
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = 0
    ignore_eos: bool = False


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def _number(obj: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    if obj.get(name) is None:
        return default
    v = obj[name]
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or v > high or v < low or (low_open and v == low):
        rng = f"{'>' if low_open else '>='} {low:g} and <= {high:g}"
        raise RequestError(400, f"{name} must be a number {rng}, got {json.dumps(v)}", name)
    return float(v)


def _content(m: dict, i: int) -> str:
    if "content" not in m or m["content"] is None:
        raise RequestError(400, f"messages[{i}].content is required (the message's text)", f"messages[{i}].content")
    c = m["content"]
    if isinstance(c, str):
        return c
    if isinstance(c, list):  # content parts: text only
        texts = []
        for k, part in enumerate(c):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise RequestError(400, f"messages[{i}].content[{k}] must be a text part "
                                   '({"type": "text", "text": "..."}); this server reads text only',
                                   f"messages[{i}].content[{k}]")
            texts.append(part["text"])
        return "\n".join(texts)
    raise RequestError(400, f"messages[{i}].content must be a string or an array of text parts, got {_kind(c)}",
                       f"messages[{i}].content")


def parse_request(body: bytes) -> ChatRequest:
    """A chat-completions request body checked field by field; :class:`RequestError` (400) names the field.

    Usage: ``parse_request(b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}')``
    """
    try:
        obj = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RequestError(400, f"the body is not UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise RequestError(400, f"the body is not JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    if not isinstance(obj, dict):
        raise RequestError(400, f"the body must be a JSON object, got {_kind(obj)}")
    msgs = obj.get("messages")
    if not isinstance(msgs, list) or not msgs:
        got = "nothing" if "messages" not in obj else "[]" if msgs == [] else _kind(msgs)
        raise RequestError(400, f"messages is required: a non-empty array of {{role, content}} objects, got {got}",
                           "messages")
    messages = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise RequestError(400, f"messages[{i}] must be an object with role and content, got {_kind(m)}",
                               f"messages[{i}]")
        if m.get("role") not in ROLES:
            raise RequestError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}, got "
                               f"{json.dumps(m.get('role'))}", f"messages[{i}].role")
        messages.append({"role": m["role"], "content": _content(m, i)})
    name = "max_completion_tokens" if obj.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = obj.get(name)
    if max_tokens is not None and (not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1):
        raise RequestError(400, f"{name} must be an integer >= 1 (the most tokens to generate), got "
                           f"{json.dumps(max_tokens)}", name)
    seed = obj.get("seed", 0)
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise RequestError(400, f"seed must be an integer or null, got {json.dumps(seed)}", "seed")
    if obj.get("n") not in (None, 1):
        raise RequestError(400, f"n must be 1 (one choice per request), got {json.dumps(obj.get('n'))}", "n")
    if obj.get("stream"):
        raise RequestError(400, "stream is not supported by this server: send stream: false", "stream")
    if not isinstance(obj.get("ignore_eos", False), bool):
        raise RequestError(400, f"ignore_eos must be true or false, got {json.dumps(obj['ignore_eos'])}", "ignore_eos")
    if not isinstance(obj.get("model", ""), str):
        raise RequestError(400, f"model must be a string, got {_kind(obj['model'])}", "model")
    return ChatRequest(messages, max_tokens, _number(obj, "temperature", 1.0, 0.0, 2.0),
                       _number(obj, "top_p", 1.0, 0.0, 1.0, low_open=True), seed, bool(obj.get("ignore_eos", False)))


class _Job:
    """One request in the queue: ``cancel`` is set when its client goes away (or the server closes), ``done``
    when ``result`` or ``error`` is there."""

    def __init__(self, req: ChatRequest):
        self.req = req
        self.cancel = threading.Event()
        self.done = threading.Event()
        self.result: Generation | None = None
        self.error: RequestError | None = None


def _takes_stop(fn: Any) -> bool:
    try:
        return "stop" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


class ChatServer(ThreadingHTTPServer):
    """The server: a thread per connection that validates and waits, and one worker thread that generates.

    Usage: ``server = ChatServer(backend, port=0, max_queue=16); server.serve_forever()`` (or :func:`serve`)
    """

    daemon_threads = True  # a connection thread never generates: closing joins the worker, not them
    block_on_close = False
    request_queue_size = 128  # the listen backlog: a burst of connections waits to be accepted, is not refused

    def __init__(self, backend: Backend, host: str = "127.0.0.1", port: int = 0,
                 fail_first: int = 0, delay_s: float = 0.0, model_name: str | None = None,
                 malformed_first: int = 0, max_queue: int = DEFAULT_MAX_QUEUE, max_body_bytes: int = MAX_BODY_BYTES):
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        super().__init__((host, port), _Handler)
        self.backend = backend
        self.model = model_name or backend.name
        self.fail_first = fail_first
        self.malformed_first = malformed_first
        self.delay_s = delay_s
        self.max_queue = max_queue
        self.max_body_bytes = max_body_bytes
        self.requests = 0
        self.rejected = 0
        self.cancelled = 0
        self.closing = threading.Event()  # set on close: delayed requests are dropped, queued ones get 503
        self._count_lock = threading.Lock()
        self._cv = threading.Condition()
        self._waiting: deque[_Job] = deque()
        self._current: _Job | None = None
        self._worker = threading.Thread(target=self._work, name="lwlib.serve generation", daemon=True)
        self._worker.start()

    @property
    def url(self) -> str:
        return f"http://{self.server_address[0]}:{self.server_address[1]}/v1"

    def next_request_fault(self) -> str | None:
        """Count a chat request; ``"fail"`` (HTTP 500), ``"malformed"`` (200, not JSON) or None (answer)."""
        with self._count_lock:
            self.requests += 1
            if self.requests <= self.fail_first:
                return "fail"
            if self.requests <= self.fail_first + self.malformed_first:
                return "malformed"
            return None

    def count(self, what: str) -> None:
        with self._count_lock:
            setattr(self, what, getattr(self, what) + 1)

    def health(self) -> dict:
        with self._cv:
            return {"status": "closing" if self.closing.is_set() else "ok", "generating": self._current is not None,
                    "waiting": len(self._waiting), "max_queue": self.max_queue}

    # -- the queue ---------------------------------------------------------------------------------------

    def submit(self, job: _Job) -> None:
        """Queue ``job``; :class:`RequestError` 429 when ``max_queue`` requests wait already, 503 when closing."""
        with self._cv:
            if self.closing.is_set():
                raise RequestError(503, "the server is shutting down", type="server_error")
            if len(self._waiting) >= self.max_queue:
                self.count("rejected")
                raise RequestError(429, f"too many requests: {len(self._waiting)} wait behind the one being "
                                   f"generated (this server's limit, --max-queue {self.max_queue}); retry later",
                                   type="rate_limit_error", code="queue_full")
            self._waiting.append(job)
            self._cv.notify_all()

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self.closing.is_set():
                    self._cv.wait()
                if self.closing.is_set():
                    return
                job = self._current = self._waiting.popleft()
            try:
                if not job.cancel.is_set():
                    job.result = self._generate(job)
            except RequestError as e:
                job.error = e
            except GenerationStopped:
                job.error = RequestError(503, "the generation was stopped (the server is shutting down)",
                                         type="server_error")
            except Exception as e:  # noqa: BLE001 - the request fails, the server goes on
                print(f"lwlib.serve: generation failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                job.error = RequestError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error")
            finally:
                with self._cv:
                    self._current = None
                job.done.set()

    def _generate(self, job: _Job) -> Generation:
        req, be = job.req, self.backend
        budget = req.max_tokens
        context, encode = getattr(be, "context_length", None), getattr(be, "encode", None)
        if isinstance(context, int) and callable(encode):
            n = len(encode(req.messages))
            if budget is None:
                budget = max(1, min(DEFAULT_MAX_TOKENS, context - n))
            if n + budget > context:
                raise RequestError(400, f"this model's context is {context} tokens; the messages have {n} and "
                                   f"max_tokens asks for {budget} more ({n + budget} in all): shorten the messages "
                                   "or lower max_tokens", "messages" if n >= context else "max_tokens",
                                   code="context_length_exceeded")
        params = GenParams(max_new_tokens=budget or DEFAULT_MAX_TOKENS, temperature=req.temperature,
                           top_p=req.top_p, seed=req.seed, ignore_eos=req.ignore_eos)
        gen_iter = getattr(be, "generate_iter", None)
        if gen_iter is not None and _takes_stop(gen_iter):
            out = None
            for _, g in gen_iter([req.messages], params, stop=job.cancel):
                out = g
            if out is None:
                raise RuntimeError(f"{getattr(be, 'name', 'the backend')} returned no output")
            return out
        return be.generate([req.messages], params)[0]

    def close(self, timeout: float | None = None) -> bool:
        """Stop generating: waiting requests get 503, the one in progress is stopped; waits up to ``timeout``
        seconds (None: as long as it takes) for the worker. True when nothing generates any more."""
        self.closing.set()
        with self._cv:
            for job in self._waiting:
                job.error = RequestError(503, "the server is shutting down", type="server_error")
                job.done.set()
            self._waiting.clear()
            if self._current is not None:
                self._current.cancel.set()
            self._cv.notify_all()
        self._worker.join(timeout)
        return not self._worker.is_alive()

    def server_close(self) -> None:
        super().server_close()
        self.close(timeout=0)

    def handle_error(self, request: Any, client_address: Any) -> None:
        e = sys.exc_info()[1]
        if isinstance(e, (ConnectionError, TimeoutError)):  # a client that went away or stalled
            return
        print(f"lwlib.serve: error on a request from {client_address[0]}: {type(e).__name__}: {e}",
              file=sys.stderr, flush=True)


class _Handler(BaseHTTPRequestHandler):
    server: ChatServer
    timeout = 60  # seconds a client may take to send its request line, headers and body

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _send(self, code: int, obj: dict, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(obj).encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)
        except (ConnectionError, TimeoutError):
            pass

    def _error(self, e: RequestError) -> None:
        self._send(e.status, e.body(), {"Retry-After": "1"} if e.status == 429 else None)

    def do_GET(self) -> None:
        path = self.path.rstrip("/")
        if path.endswith("/models"):
            self._send(200, {"object": "list", "data": [{"id": self.server.model, "object": "model"}]})
        elif path.endswith("/health"):
            self._send(200, self.server.health())
        else:
            self._error(RequestError(404, f"no route {self.path}", code="not_found"))

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            raise RequestError(411, "Transfer-Encoding is not supported: send the body with a Content-Length",
                               code="length_required")
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError(411, "a POST needs a Content-Length header", code="length_required")
        try:
            n = int(length)
        except ValueError:
            n = -1
        if n < 0:
            raise RequestError(400, f"Content-Length must be an integer >= 0, got {length!r}")
        if n > self.server.max_body_bytes:
            raise RequestError(413, f"the body is {n} bytes; this server takes at most {self.server.max_body_bytes}",
                               code="body_too_large")
        body = self.rfile.read(n)
        if len(body) < n:
            raise RequestError(400, f"the body ended after {len(body)} of its {n} bytes (Content-Length)")
        return body

    def do_POST(self) -> None:
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._error(RequestError(404, f"no route {self.path}", code="not_found"))
            return
        try:
            req = parse_request(self._body())
        except RequestError as e:
            self._error(e)
            return
        except TimeoutError:
            self._error(RequestError(408, f"the body did not arrive within {self.timeout} s"))
            return
        fault = self.server.next_request_fault()
        if fault == "fail":
            self._send(500, {"error": {"message": "injected failure", "type": "server_error"}})
            return
        if fault == "malformed":
            body = b'{"id": "chatcmpl-x", "choices": [{"message": {"content": "cut off'
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if self.server.delay_s and self.server.closing.wait(self.server.delay_s):
            return  # the server is closing: drop the request (the client sees the connection close)
        job = _Job(req)
        try:
            self.server.submit(job)
        except RequestError as e:
            self._error(e)
            return
        if self._wait(job):
            job.cancel.set()  # leaves the queue, or its generation stops
            self.server.count("cancelled")
            return
        if job.error is not None:
            self._error(job.error)
            return
        g = job.result
        self._send(200, {
            "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.server.model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": g.text},
                "finish_reason": "length" if g.hit_limit else "stop",
            }],
            "usage": {
                "prompt_tokens": g.prompt_tokens,
                "completion_tokens": g.completion_tokens,
                "total_tokens": g.prompt_tokens + g.completion_tokens,
            },
        })

    def _wait(self, job: _Job) -> bool:
        """Wait for ``job``; True when the client disconnected first (its socket reads EOF)."""
        watch = True
        while not job.done.wait(0.1 if watch else 1.0):
            if not watch:
                continue
            try:
                readable, _, _ = select.select([self.connection], [], [], 0)
                if readable:
                    if self.connection.recv(1, socket.MSG_PEEK) == b"":
                        return True
                    watch = False  # the client sent more (pipelining): no more looking
            except (OSError, ValueError):  # reset, or closed
                return True
        return False


@contextmanager
def serve(backend: Backend, **kwargs: Any) -> Iterator[ChatServer]:
    """Run a :class:`ChatServer` in a background thread for the duration of the ``with`` block; on exit it stops
    accepting, stops the generation in progress and waits for it: nothing generates after ``serve`` returns."""
    server = ChatServer(backend, **kwargs)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield server
    finally:
        server.closing.set()
        server.shutdown()
        server.close()
        server.server_close()


def main(argv: list[str] | None = None) -> int:
    """``python -m lwlib.serve``: serve a local model over the OpenAI chat-completions API until SIGINT/SIGTERM."""
    ap = argparse.ArgumentParser(prog="python -m lwlib.serve", description="Serve a local model (the bundled one, "
                                 "a checkpoint folder or a Hugging Face id) as an OpenAI-compatible chat-completions "
                                 "server: POST /v1/chat/completions, GET /v1/models, GET /health. Ctrl-C (SIGINT) or "
                                 "SIGTERM stops it.")
    ap.add_argument("--model", default="smollm2-135m-instruct",
                    help="built-in name, model folder (e.g. runs/gpu/sft/model) or Hugging Face id "
                         "(default: the bundled smollm2-135m-instruct)")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    ap.add_argument("--batch-size", type=int, default=8, help="prompts per generate call (default 8)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    ap.add_argument("--dtype", default="auto", help="auto | bfloat16 | float16 | float32 (default auto)")
    ap.add_argument("--model-name", default=None,
                    help="the model id clients send and /v1/models lists (default: --model as given)")
    ap.add_argument("--max-queue", type=int, default=DEFAULT_MAX_QUEUE,
                    help=f"requests that may wait behind the one being generated; more get HTTP 429 "
                         f"(default {DEFAULT_MAX_QUEUE})")
    ap.add_argument("--engine", default="generate", choices=["generate", "slots"],
                    help="local decoding engine (lwlib.backends.LocalBackend): generate (transformers generate, "
                         "the default) or slots (static KV cache, CUDA graphs: several times faster on a GPU)")
    ap.add_argument("--kv-cache-gb", type=float, default=None,
                    help="slots: memory for the KV cache (default: 60%% of free GPU memory; CPU: 4 GB)")
    args = ap.parse_args(argv)
    if args.max_queue < 0:
        ap.error(f"--max-queue must be >= 0, got {args.max_queue}")

    stopping: list[int] = []

    def stop(signum: int, frame: Any) -> None:
        if stopping:  # a second signal: no more waiting
            print(f"lwlib.serve: {signal.Signals(signum).name} again: exiting now", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        stopping.append(signum)
        raise KeyboardInterrupt

    # installed whatever this process inherited: a background job of a non-interactive shell starts with SIGINT
    # ignored, and Python then installs no KeyboardInterrupt handler of its own
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    from .backends import LocalBackend

    server = None
    try:
        print(f"lwlib.serve: loading {args.model} ...", file=sys.stderr, flush=True)
        backend = LocalBackend(args.model, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                               engine=args.engine, kv_cache_gb=args.kv_cache_gb)
        try:
            server = ChatServer(backend, host=args.host, port=args.port, model_name=args.model_name or args.model,
                                max_queue=args.max_queue)
        except OSError as e:
            print(f"lwlib.serve: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
            return 1
        print(f"lwlib.serve: serving model {server.model!r} on {backend.device} at {server.url} "
              f"(OpenAI-compatible; up to {server.max_queue} requests wait, more get 429; Ctrl-C stops)", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        if server is not None:
            server.server_close()  # no new connections; waiting requests get 503, the generation is stopped
            if not server.close(timeout=STOP_GRACE_S):
                print(f"lwlib.serve: the generation did not stop within {STOP_GRACE_S:g} s; exiting without it",
                      file=sys.stderr, flush=True)
                sys.stdout.flush()
                os._exit(1)
    print("lwlib.serve: stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    code = main()
    # no interpreter teardown: a daemon connection thread still inside torch or the tokenizer when Python finalizes is
    # unwound by pthread_exit through C++ frames, which aborts the process ("terminate called without an active
    # exception", exit -6) after a clean stop; everything is flushed and the worker has already been joined
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
