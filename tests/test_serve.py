"""The loopback OpenAI-compatible server (lwlib.serve, issue 29): bad requests get a 4xx naming the field, the
model's context bounds a request, a client that leaves stops its generation, a burst is queued or refused with 429
and never dropped. Loopback only, bounded in time; the backends are stand-ins except where the bundled model is
the point."""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest

from lwlib.backends import Generation, GenerationStopped, GenParams, OpenAIBackend
from lwlib.serve import DEFAULT_MAX_TOKENS, serve

MSG = [{"role": "user", "content": "Say hi."}]


class Echo:
    """Answers at once with the budget it was given (no model); counts its calls."""

    name = "echo"

    def __init__(self):
        self.calls = 0

    def generate(self, prompts, params, max_new_tokens=None, desc=None):
        self.calls += 1
        return [Generation(f"budget {params.max_new_tokens}", 5, 3, "stop") for _ in prompts]


class Counter:
    """A backend that 'decodes' one token per ``step_s`` until its budget or until ``stop`` is set; tells its
    context (100 tokens, one per character of the messages) like the local backend."""

    name = "counter"
    context_length = 100

    def __init__(self, step_s: float = 0.0):
        self.step_s = step_s
        self.started = threading.Event()
        self.stopped = threading.Event()
        self.budgets: list[int] = []

    def encode(self, messages):
        return list(range(sum(len(m["content"]) for m in messages)))

    def generate_iter(self, prompts, params, max_new_tokens=None, desc=None, stop=None):
        self.budgets.append(params.max_new_tokens)
        self.started.set()
        for _ in range(params.max_new_tokens):
            if stop is not None and stop.wait(self.step_s):
                self.stopped.set()
                raise GenerationStopped("stopped")
        yield 0, Generation("done", len(self.encode(prompts[0])), params.max_new_tokens, "length")


def post(server, body: bytes | dict, headers: dict | None = None) -> tuple[int, dict]:
    c = http.client.HTTPConnection(*server.server_address, timeout=30)
    try:
        c.request("POST", "/v1/chat/completions", body=json.dumps(body) if isinstance(body, dict) else body,
                  headers=headers or {})
        r = c.getresponse()
        return r.status, json.loads(r.read())
    finally:
        c.close()


def raw(server, data: bytes) -> bytes:
    """Send ``data`` as it is on a new connection and end it there (half-close); the answer until the server
    closes the connection."""
    with socket.create_connection(server.server_address, timeout=30) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


BAD = [  # (body, status, param, words of the message)
    (b"[1, 2]", 400, None, "must be a JSON object, got an array"),
    (b"{not json", 400, None, "not JSON"),
    (b'{"messages": "hi"}\xff', 400, None, "not UTF-8"),
    ({"model": "m"}, 400, "messages", "messages is required"),
    ({"messages": []}, 400, "messages", "non-empty"),
    ({"messages": ["hi"]}, 400, "messages[0]", "must be an object"),
    ({"messages": [{"role": "user"}]}, 400, "messages[0].content", "content is required"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", "string or an array"),
    ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", "role must be one of"),
    ({"messages": MSG, "temperature": "abc"}, 400, "temperature", 'got "abc"'),
    ({"messages": MSG, "temperature": -1}, 400, "temperature", ">= 0"),
    ({"messages": MSG, "top_p": 0}, 400, "top_p", "> 0"),
    ({"messages": MSG, "max_tokens": -5}, 400, "max_tokens", "integer >= 1"),
    ({"messages": MSG, "max_tokens": "x"}, 400, "max_tokens", 'got "x"'),
    ({"messages": MSG, "max_tokens": 0}, 400, "max_tokens", "got 0"),
    ({"messages": MSG, "max_tokens": 2.5}, 400, "max_tokens", "got 2.5"),
    ({"messages": MSG, "max_completion_tokens": True}, 400, "max_completion_tokens", "got true"),
    ({"messages": MSG, "seed": "s"}, 400, "seed", "integer or null"),
    ({"messages": MSG, "n": 2}, 400, "n", "n must be 1"),
    ({"messages": MSG, "stream": True}, 400, "stream", "not supported"),
]


@pytest.mark.parametrize("body,status,param,words", BAD, ids=[f"{i}-{b[2] or 'body'}" for i, b in enumerate(BAD)])
def test_bad_request_gets_a_4xx_naming_the_field(body, status, param, words, capfd):
    echo = Echo()
    with serve(echo) as server:
        got, obj = post(server, body)
        assert got == status and obj["error"]["param"] == param and words in obj["error"]["message"], obj
        assert obj["error"]["type"] == "invalid_request_error"
        assert post(server, {"messages": MSG, "max_tokens": 3})[0] == 200  # still serving
    assert echo.calls == 1 and server.requests == 1  # the bad one reached nothing
    assert "Traceback" not in capfd.readouterr().err


def test_bad_content_length_and_body_size_are_refused_without_hanging():
    with serve(Echo(), max_body_bytes=1000) as server:
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
        for extra, status in [(b"Content-Length: -1\r\n", b"400"), (b"Content-Length: x\r\n", b"400"),
                              (b"", b"411"), (b"Transfer-Encoding: chunked\r\n", b"411"),
                              (b"Content-Length: 5000\r\n", b"413")]:
            out = raw(server, head + extra + b"\r\n{}")
            assert out.split(b"\r\n")[0].split(b" ")[1] == status, (extra, out[:200])
            assert b'"error"' in out
        out = raw(server, head + b"Content-Length: 50\r\n\r\n" + b'{"messages": [')  # the client ends early
        assert b" 400 " in out.split(b"\r\n")[0] and b"ended after 14 of its 50 bytes" in out
        status, obj = post(server, {"messages": MSG})
        assert status == 200 and obj["choices"][0]["message"]["content"] == f"budget {DEFAULT_MAX_TOKENS}"


def test_prompt_and_max_tokens_beyond_the_context_is_a_400():
    be = Counter()
    with serve(be) as server:
        status, obj = post(server, {"messages": [{"role": "user", "content": "x" * 150}], "max_tokens": 5})
        assert status == 400 and obj["error"]["param"] == "messages"
        assert obj["error"]["code"] == "context_length_exceeded" and "context is 100 tokens" in obj["error"]["message"]
        status, obj = post(server, {"messages": [{"role": "user", "content": "x" * 60}], "max_tokens": 41})
        assert status == 400 and obj["error"]["param"] == "max_tokens" and "101 in all" in obj["error"]["message"]
        assert post(server, {"messages": [{"role": "user", "content": "x" * 60}], "max_tokens": 40})[0] == 200
        assert post(server, {"messages": [{"role": "user", "content": "x" * 60}]})[0] == 200  # no max_tokens: ...
    assert be.budgets == [40, 40]  # ... the default, cut to what the context leaves


def test_a_huge_prompt_to_the_bundled_model_is_a_400_not_an_allocation(local_backend):
    with serve(local_backend) as server:
        status, obj = post(server, {"messages": [{"role": "user", "content": "word " * 40_000}], "max_tokens": 10})
        assert status == 400 and obj["error"]["code"] == "context_length_exceeded", obj
        assert "context is 8192 tokens" in obj["error"]["message"]
        status, obj = post(server, {"messages": MSG, "max_tokens": 8192})
        assert status == 400 and obj["error"]["param"] == "max_tokens"


def _send_and_leave(server, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    s = socket.create_connection(server.server_address, timeout=30)
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


def _wait_until(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_a_client_that_disconnects_stops_its_generation_and_leaves_the_queue():
    be = Counter(step_s=0.05)
    with serve(be) as server:
        first = _send_and_leave(server, {"messages": MSG, "max_tokens": 90})  # 4.5 s of "decoding" unless stopped
        assert be.started.wait(30)
        queued = _send_and_leave(server, {"messages": MSG, "max_tokens": 90})
        _wait_until(lambda: server.health()["waiting"] == 1)
        queued.close()  # leaves while waiting: never generated
        _wait_until(lambda: server.cancelled == 1)
        first.close()  # leaves while being generated: stopped
        assert be.stopped.wait(30)
        status, obj = post(server, {"messages": MSG, "max_tokens": 5})  # the server goes on
        assert status == 200 and obj["choices"][0]["finish_reason"] == "length"
    assert be.budgets == [90, 5] and server.cancelled == 2


def test_a_client_that_disconnects_stops_the_bundled_models_generation(local_backend):
    """The local backend stops after the current decoding step: a request for 7,000 tokens that ignores the end
    token (minutes on a CPU) ends soon after its client leaves, and the next request is answered."""

    class Watched:
        name = local_backend.name
        context_length = local_backend.context_length
        encode = staticmethod(local_backend.encode)

        def __init__(self):
            self.started, self.stopped = threading.Event(), threading.Event()

        def generate_iter(self, prompts, params, max_new_tokens=None, desc=None, stop=None):
            self.started.set()
            try:
                yield from local_backend.generate_iter(prompts, params, stop=stop)
            except GenerationStopped:
                self.stopped.set()
                raise

    be = Watched()
    with serve(be) as server:
        s = _send_and_leave(server, {"messages": MSG, "max_tokens": 7000, "ignore_eos": True, "temperature": 0})
        assert be.started.wait(60)
        s.close()
        assert be.stopped.wait(120)
        api = OpenAIBackend(server.model, base_url=server.url, max_retries=0)
        g = api.generate(["Say hi."], GenParams(max_new_tokens=4, temperature=0))[0]
        assert g.error is None and 0 < g.completion_tokens <= 4
    assert server.cancelled == 1


class Gate:
    """The first call waits for ``release`` (having set ``arrived``); every call answers."""

    name = "gate"

    def __init__(self):
        self.arrived, self.release = threading.Event(), threading.Event()
        self.calls = 0

    def generate(self, prompts, params, max_new_tokens=None, desc=None):
        self.calls += 1
        if self.calls == 1:
            self.arrived.set()
            assert self.release.wait(60)
        return [Generation("ok", 1, 1, "stop") for _ in prompts]


def test_a_burst_of_50_is_queued_up_to_the_limit_and_the_rest_refused_with_429():
    """50 concurrent clients, one request each, while the first is being generated: 8 wait (the limit), 41 are
    refused at once with 429 and Retry-After; when the generation goes on, the 9 are answered; none is dropped."""
    gate = Gate()
    with serve(gate, max_queue=8) as server:
        results: list[tuple[int, dict, str | None]] = []
        lock = threading.Lock()

        def client():
            c = http.client.HTTPConnection(*server.server_address, timeout=60)
            try:
                c.request("POST", "/v1/chat/completions", body=json.dumps({"messages": MSG, "max_tokens": 4}))
                r = c.getresponse()
                item = (r.status, json.loads(r.read()), r.getheader("Retry-After"))
            except Exception as e:  # noqa: BLE001 - a dropped request is what this test looks for
                item = (0, {"exception": repr(e)}, None)
            finally:
                c.close()
            with lock:
                results.append(item)

        first = threading.Thread(target=client)
        first.start()
        assert gate.arrived.wait(30)  # the first one is being generated
        rest = [threading.Thread(target=client) for _ in range(49)]
        for t in rest:
            t.start()
        deadline = time.monotonic() + 50
        while True:  # until 41 have been refused and 8 wait
            with lock:
                refused = sum(1 for r in results if r[0] == 429)
            if refused == 41 and server.health()["waiting"] == 8:
                break
            assert time.monotonic() < deadline, (refused, server.health(), results[:3])
            time.sleep(0.02)
        gate.release.set()
        for t in [first, *rest]:
            t.join(60)
        assert len(results) == 50
        statuses = sorted(r[0] for r in results)
        assert statuses == [200] * 9 + [429] * 41, statuses
        assert all(r[2] == "1" and r[1]["error"]["code"] == "queue_full" for r in results if r[0] == 429)
        assert gate.calls == 9 and server.rejected == 41
        c = http.client.HTTPConnection(*server.server_address, timeout=30)
        c.request("GET", "/v1/models")
        assert c.getresponse().status == 200  # still up
        assert server.health() == {"status": "ok", "generating": False, "waiting": 0, "max_queue": 8}


@pytest.mark.parametrize("engine", ["generate", "slots"])
def test_the_local_backend_stops_when_its_stop_event_is_set(model_and_tok, engine):
    """What lwlib.serve relies on: ``generate_iter(stop=event)`` ends after the current step (generate) or segment
    (slots) once the event is set, raises GenerationStopped and yields nothing unfinished."""
    from lwlib.backends import LocalBackend

    model, tok = model_and_tok
    be = LocalBackend(model, tok, batch_size=2, engine=engine, segment_tokens=2, cuda_graphs=False)
    stop = threading.Event()
    if engine == "generate":  # both rows decode in one transformers call: stopped after its first step
        stop.set()
    p = GenParams(max_new_tokens=500, temperature=0, ignore_eos=True)
    got = []
    with pytest.raises(GenerationStopped):
        for i, g in be.generate_iter(["Say hi.", "Name a color."], p, max_new_tokens=[2, 500], stop=stop):
            got.append((i, g.completion_tokens))
            stop.set()  # slots: after the short row, the long one is cut at the next segment
    assert got == ([(0, 2)] if engine == "slots" else [])
    stop.clear()
    assert be.generate(["Say hi."], GenParams(1, temperature=0))[0].completion_tokens == 1  # usable after
