"""A small OpenAI-compatible chat-completions server on loopback, answering with a local backend.

It lets every API path (AgentWrite with an API model, the LongBench-Write judge, DPO scoring) run
for real without network access: tests use it as a fixture, and the smoke/gpu profiles use it as the
"local judge" when no API model is configured. It speaks ``POST /v1/chat/completions`` (non-streaming)
and ``GET /v1/models``. Fault injection for tests: ``fail_first`` answers the first N requests with HTTP
500, ``malformed_first`` answers the next N with HTTP 200 and a body that is not JSON, and ``delay_s``
sleeps before answering (to exercise client timeouts and interrupts). ``requests`` counts the chat requests
received.

Usage::

    with serve(LocalBackend("smollm2-135m-instruct")) as server:
        be = OpenAIBackend(server.model, base_url=server.url)

    python -m lwlib.serve                                   # the bundled model on http://127.0.0.1:8000/v1
    python -m lwlib.serve --model runs/gpu/sft/model --port 8001 --model-name longwriter-sft

From the command line it serves until Ctrl-C (or SIGTERM), for other tools (an OpenAI client, a chat UI,
``bench.judge.kind: openai`` with ``base_url``). Requests are answered one at a time (the local backend
holds a lock); ``--batch-size`` bounds the prompts of one request decoded together.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
import uuid
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

from .backends import Backend, GenParams


class ChatServer(ThreadingHTTPServer):
    daemon_threads = False  # closing the server waits for its handlers: none generates after ``serve`` returns

    def __init__(self, backend: Backend, host: str = "127.0.0.1", port: int = 0,
                 fail_first: int = 0, delay_s: float = 0.0, model_name: str | None = None,
                 malformed_first: int = 0):
        super().__init__((host, port), _Handler)
        self.backend = backend
        self.model = model_name or backend.name
        self.fail_first = fail_first
        self.malformed_first = malformed_first
        self.delay_s = delay_s
        self.requests = 0
        self.closing = threading.Event()  # set by serve() on exit: a delayed request is then dropped unanswered
        self._count_lock = threading.Lock()

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


class _Handler(BaseHTTPRequestHandler):
    server: ChatServer

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def _send(self, code: int, obj: dict) -> None:
        body = json.dumps(obj).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_GET(self) -> None:
        if self.path.rstrip("/").endswith("/models"):
            self._send(200, {"object": "list", "data": [{"id": self.server.model, "object": "model"}]})
        else:
            self._send(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:
        if not self.path.rstrip("/").endswith("/chat/completions"):
            self._send(404, {"error": {"message": f"no route {self.path}"}})
            return
        try:
            req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
            messages = req["messages"]
        except (ValueError, KeyError) as e:
            self._send(400, {"error": {"message": f"bad request: {e}"}})
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
        params = GenParams(
            max_new_tokens=int(req.get("max_tokens") or req.get("max_completion_tokens") or 512),
            temperature=float(req.get("temperature", 1.0)),
            top_p=float(req.get("top_p", 1.0)),
            seed=req.get("seed", 0),
        )
        g = self.server.backend.generate([messages], params)[0]
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


@contextmanager
def serve(backend: Backend, **kwargs: Any) -> Iterator[ChatServer]:
    """Run a :class:`ChatServer` in a background thread for the duration of the ``with`` block."""
    server = ChatServer(backend, **kwargs)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield server
    finally:
        server.closing.set()
        server.shutdown()
        server.server_close()  # joins the request threads


def main(argv: list[str] | None = None) -> int:
    """``python -m lwlib.serve``: serve a local model over the OpenAI chat-completions API until Ctrl-C."""
    ap = argparse.ArgumentParser(prog="python -m lwlib.serve", description="Serve a local model (the bundled one, "
                                 "a checkpoint folder or a Hugging Face id) as an OpenAI-compatible chat-completions "
                                 "server: POST /v1/chat/completions, GET /v1/models. Ctrl-C stops it.")
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
    args = ap.parse_args(argv)

    from .backends import LocalBackend

    print(f"lwlib.serve: loading {args.model} ...", file=sys.stderr, flush=True)
    backend = LocalBackend(args.model, batch_size=args.batch_size, device=args.device, dtype=args.dtype)
    try:
        server = ChatServer(backend, host=args.host, port=args.port, model_name=args.model_name or args.model)
    except OSError as e:
        print(f"lwlib.serve: cannot listen on {args.host}:{args.port}: {e}", file=sys.stderr)
        return 1

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    print(f"lwlib.serve: serving model {server.model!r} on {backend.device} at {server.url} "
          f"(OpenAI-compatible; Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    print("lwlib.serve: stopped", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
