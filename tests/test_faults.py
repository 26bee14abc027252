"""Fault injection (issues 19, 29): results cannot go stale or doubled, and stopping stops. Loopback only, bounded
in time.

Config change between runs (refused, nothing mixed), two writers (second refused, named), SIGTERM to the runner
(nothing left running, no record after), SIGINT to a runner started with SIGINT ignored, SIGKILL to the runner (a
second one is refused naming what still holds the lock), an interrupt during an API stage (returns at once, nothing
sent after; also with SIGINT ignored), a download that never answers, malformed JSON from the server (retried, then
an error that is not stored). The store's edges (issue 29): a complete bad last line, a set-aside file of the same
fingerprint, a failed append (ENOSPC), invalid UTF-8, a missing given data path, a wrong checksum, dtype and device
in the fingerprint, negative sizes, a lock left to a child.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
import yaml

from lwlib import data
from lwlib.backends import Generation, GenParams, OpenAIBackend
from lwlib.config import load_profile
from lwlib.probe import run_probe
from lwlib.runs import (REPO_ROOT, JsonlStore, RunLockedError, StaleRunError, fingerprint_id, read_fingerprint,
                        read_jsonl, read_records)
from lwlib.serve import serve
from nbutil import fake_repo


class Echo:
    """A backend for the loopback server that answers at once with a fixed text (no model)."""

    name = "echo"

    def generate(self, prompts, params, max_new_tokens=None, desc=None):
        return [Generation(f"An answer of {params.max_new_tokens} tokens at most.", 5, 9, "stop") for _ in prompts]


def _probe_profile(root: Path, **over):
    return load_profile("smoke", run_root=root, overrides={
        "probe.languages": ["en"], "probe.lengths": [1000], "probe.templates": 1, "probe.max_new_tokens": 4,
        **over})


class Counting:
    """A local backend that writes ``max_new_tokens`` numbered words per prompt and counts what it was asked."""

    name = "counting"

    def __init__(self):
        self.prompts = 0

    def generate_iter(self, prompts, params, max_new_tokens=None, desc=None):
        for i, _ in enumerate(prompts):
            self.prompts += 1
            n = params.max_new_tokens
            yield i, Generation(" ".join(f"w{k}" for k in range(n)), 10, n, "length")


def test_changed_config_is_refused_names_the_change_and_mixes_nothing(tmp_path):
    be = Counting()
    prof = _probe_profile(tmp_path)
    run_probe(prof, prof.model, "base", backend=be)
    out = tmp_path / "smoke" / "probe" / "base" / "paper"  # smoke's first decoding
    before = (out / "generations.jsonl").read_bytes()
    manifest = (out / "manifest.json").read_bytes()
    assert json.loads((out / "generations.jsonl.fingerprint.json").read_text())["fingerprint"]["max_new_tokens"] == 4
    changed = _probe_profile(tmp_path, **{"probe.max_new_tokens": 6,
                                          "decodings": [{"name": "paper", "temperature": 0.9}]})
    with pytest.raises(StaleRunError) as e:
        run_probe(changed, changed.model, "base", backend=be)
    msg = str(e.value)
    assert "max_new_tokens: 4 -> 6" in msg and "0.5 -> 0.9" in msg
    assert "probe.overwrite: true" in msg and "`name`" in msg and str(out / "generations.jsonl") in msg
    assert {k.split(".")[0] for k in e.value.changed} == {"max_new_tokens", "decoding"} and be.prompts == 1
    assert (out / "generations.jsonl").read_bytes() == before  # nothing mixed in
    assert (out / "manifest.json").read_bytes() == manifest  # and the manifest still describes the records
    with pytest.raises(StaleRunError, match="model: \"smollm2-135m-instruct\" -> \"other-model\""):
        run_probe(prof, "other-model", "base", backend=be)  # another model under the same tag

    # a copied profile that keeps `name: smoke` writes into the same run folder: refused the same way
    copy = yaml.safe_load((REPO_ROOT / "lwlib" / "profiles" / "smoke.yaml").read_text())
    copy["probe"].update(languages=["en"], lengths=[1000], templates=1, max_new_tokens=5)
    (tmp_path / "mine.yaml").write_text(yaml.safe_dump(copy))
    mine = load_profile(tmp_path / "mine.yaml", run_root=tmp_path)
    assert mine.run_dir == tmp_path / "smoke"
    with pytest.raises(StaleRunError, match="max_new_tokens: 4 -> 5"):
        run_probe(mine, mine.model, "base", backend=be)

    # a wider selection with the same settings is not a change: it resumes and adds the new items only
    wider = _probe_profile(tmp_path, **{"probe.lengths": [1000, 2000]})
    df = run_probe(wider, wider.model, "base", backend=be)
    assert sorted(df["required_length"]) == [1000, 2000] and be.prompts == 2
    assert read_jsonl(out / "generations.jsonl")[0] == json.loads(before)
    assert len(run_probe(prof, prof.model, "base", backend=be)) == 1  # the narrower one sees its own items only

    # overwrite: the old records move aside, the new settings start from nothing
    ow = _probe_profile(tmp_path, **{"probe.max_new_tokens": 6, "probe.overwrite": True})
    with pytest.warns(UserWarning, match="moved aside"):
        df = run_probe(ow, ow.model, "base", backend=be)
    assert len(df) == 1 and (df["tokens"] == 6).all() and len(read_jsonl(out / "generations.jsonl")) == 1
    aside = [p for p in out.glob("generations.jsonl.stale-*") if not p.name.endswith(".fingerprint.json")]
    assert len(aside) == 1 and [r["tokens"] for r in read_jsonl(aside[0])] == [4, 4]
    assert json.loads((out / "manifest.json").read_text())["config"]["probe"]["max_new_tokens"] == 6


def test_retrained_checkpoint_in_the_same_folder_is_a_changed_model(tmp_path):
    """A model folder is identified by its weights too: SFT retrained into runs/<name>/sft/model (same path)
    makes the records of the old checkpoint stale."""
    from lwlib.runs import model_fingerprint

    ckpt = tmp_path / "run" / "sft" / "model"
    ckpt.mkdir(parents=True)
    (ckpt / "config.json").write_text('{"hidden_size": 8}')
    (ckpt / "model.safetensors").write_bytes(bytes(range(256)) * 20000)  # 5 MB: first and last MiB hashed
    a = model_fingerprint(str(ckpt), tmp_path / "run")
    assert a.startswith("sft/model@") and model_fingerprint(str(ckpt), tmp_path / "run") == a
    w = bytearray((ckpt / "model.safetensors").read_bytes())
    w[-10] ^= 1  # the last tensors changed
    (ckpt / "model.safetensors").write_bytes(bytes(w))
    assert model_fingerprint(str(ckpt), tmp_path / "run") != a
    assert model_fingerprint("smollm2-135m-instruct") == "smollm2-135m-instruct"
    # trained again for a later sitting (lwlib.sft.rebuild_run): named by the run it rebuilds, whatever its weights,
    # while its loss curve is within tolerance of the recorded one
    (ckpt.parent / "train_log.recorded.json").write_text('{"log_history": [{"step": 1, "loss": 3.8}]}')
    (ckpt.parent / "rebuild.json").write_text('{"within_tol": true}')
    r = model_fingerprint(str(ckpt), tmp_path / "run")
    assert r.startswith("sft/model@rebuilt-")
    (ckpt / "model.safetensors").write_bytes(bytes(range(256)) * 20000)  # the next sitting's rebuild
    assert model_fingerprint(str(ckpt), tmp_path / "run") == r
    (ckpt.parent / "train_log.recorded.json").write_text('{"log_history": [{"step": 1, "loss": 3.9}]}')
    assert model_fingerprint(str(ckpt), tmp_path / "run") not in (r, a)  # another run
    (ckpt.parent / "rebuild.json").write_text('{"within_tol": false}')  # beyond tolerance: its weights again
    assert model_fingerprint(str(ckpt), tmp_path / "run") == a


def test_a_second_writer_is_refused_and_named(tmp_path):
    folder = tmp_path / "stage"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from lwlib.runs import lock_dir; lock_dir(sys.argv[1]); "
         "print('locked', flush=True); time.sleep(60)", str(folder)],
        stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=rf"PID {holder.pid}\b") as e:
            JsonlStore(folder / "records.jsonl", fingerprint={"model": "m"})
        assert e.value.pid == holder.pid and "twice" in str(e.value)
        reader = JsonlStore(folder / "records.jsonl")  # reading needs no lock ...
        with pytest.raises(RunLockedError):
            reader.append({"id": 1})  # ... writing does
        assert not (folder / "records.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    store = JsonlStore(folder / "records.jsonl", fingerprint={"model": "m"})  # a dead holder leaves no lock
    store.append({"id": 1})
    assert read_jsonl(folder / "records.jsonl") == [{"id": 1}]


def test_two_writers_on_one_file_are_reported_not_merged(tmp_path):
    """What two unlocked writers left behind (each record twice) is an error naming file, lines and key, also
    for the DPO reader, instead of the last copy winning or every line counting."""
    from lwlib.dpo import load_scored

    prof = load_profile("smoke", run_root=tmp_path)
    run = prof.stage_dir("dpo")
    rec = {"id": "gen-1-0-s0", "instruction_id": "gen-1-0", "sample": 0, "required_length": 100, "words": 90,
           "tokens": 120, "finish_reason": "stop"}
    (run / "samples.jsonl").write_text(json.dumps(rec) + "\n" + json.dumps({**rec, "id": "gen-1-0-s1"}) + "\n"
                                       + json.dumps(rec) + "\n")
    (run / "scores.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"samples\.jsonl:3: duplicate key 'gen-1-0-s0' \(first at line 1\)"):
        load_scored(prof)
    with pytest.raises(ValueError, match=r"samples\.jsonl:3: duplicate key"):
        JsonlStore(run / "samples.jsonl")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"  # a zombie is dead
    except (OSError, IndexError):
        return True


def _tick_notebook():
    import nbformat.v4 as nbf

    nb = nbf.new_notebook(cells=[
        nbf.new_code_cell('profile = "x"', metadata={"tags": ["parameters"]}),
        nbf.new_code_cell(
            "import os, time\n"
            "from lwlib.config import load_profile\n"
            "from lwlib.runs import JsonlStore, atomic_write_text\n"
            "prof = load_profile(profile)\n"
            "store = JsonlStore(prof.stage_dir('tick') / 'ticks.jsonl', fingerprint={'k': 1}, stage='tick')\n"
            "atomic_write_text(prof.run_dir / 'kernel.pid', f'{os.getpid()} {os.getppid()}')\n"
            "for i in range(2400):\n"
            "    store.append({'id': i, 't': time.time()})\n"
            "    time.sleep(0.025)\n"),
    ])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


class Ticking:
    """run_all.sh with real papermill and a real kernel on a tiny notebook that appends a record every 25 ms,
    started and waited for until it ticks: ``runner``, ``kernel`` and ``papermill`` PIDs, the ``ticks`` store."""

    def __init__(self, tmp_path: Path, sigint_ignored: bool = False):
        self.repo = fake_repo(tmp_path, notebooks={"01_tick.ipynb": _tick_notebook()})
        self.prof_file = tmp_path / "tick.yaml"
        self.prof_file.write_text("name: ticks\nmodel: none\n")
        self.run = tmp_path / "runs" / "ticks"
        self.env = {**os.environ, "LWLIB_RUNS": str(tmp_path / "runs"), "PYTHONPATH": str(REPO_ROOT)}
        argv = self.argv()
        self.runner = subprocess.Popen(_sigint_ignored(argv) if sigint_ignored else argv, env=self.env,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                       start_new_session=True)
        self.ticks = self.run / "tick" / "ticks.jsonl"
        self.kernel = self.papermill = None
        t0 = time.monotonic()
        try:
            while not (self.ticks.exists() and len(self.ticks.read_text().splitlines()) >= 3
                       and (self.run / "kernel.pid").exists()):
                assert self.runner.poll() is None, self.runner.communicate()
                assert time.monotonic() - t0 < 90, "the kernel did not start"
                time.sleep(0.1)
            self.kernel, self.papermill = map(int, (self.run / "kernel.pid").read_text().split())
        except BaseException:
            self.kill_all()
            raise

    def argv(self) -> list[str]:
        return [str(self.repo / "run_all.sh"), str(self.prof_file)]

    def wait_gone(self, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while (_alive(self.kernel) or _alive(self.papermill)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(self.kernel) and not _alive(self.papermill)

    def kill_all(self) -> None:
        if self.runner.poll() is None:
            os.killpg(self.runner.pid, signal.SIGKILL)
            self.runner.wait()
        for pid in (self.kernel, self.papermill):  # in sessions or groups of their own
            if pid is not None and _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_sigterm_stops_the_runner_papermill_and_the_kernel_and_a_second_runner_is_refused(tmp_path):
    """run_all.sh with real papermill and a real kernel on a tiny notebook that appends a record every 25 ms."""
    t = Ticking(tmp_path)
    runner, ticks, env, kernel = t.runner, t.ticks, t.env, t.kernel
    try:
        second = subprocess.run(t.argv(), env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode == 75 and f"PID {runner.pid}" in second.stderr, second.stderr
        with pytest.raises(RunLockedError, match=f"PID {kernel}"):  # and in Python, the kernel holds the stage
            JsonlStore(ticks, fingerprint={"k": 1})

        runner.send_signal(signal.SIGTERM)
        t_sig = time.monotonic()
        _, err = runner.communicate(timeout=15)
        assert runner.returncode == 143 and "stopped by SIGTERM" in err, err
        assert time.monotonic() - t_sig < 8
        t.wait_gone(3.0)
        n = len(read_jsonl(ticks))
        time.sleep(1.0)
        assert len(read_jsonl(ticks)) == n  # no record after the runner returned
    finally:
        t.kill_all()
    # the lock went with the run: a new writer may start
    JsonlStore(ticks, fingerprint={"k": 1}).append({"id": "after"})


def test_sigint_stops_a_runner_started_with_sigint_ignored(tmp_path):
    """As a background job of a non-interactive shell (CI), run_all.sh starts with SIGINT ignored, where bash cannot
    trap it: it restarts itself with SIGINT at its default, so its INT trap stops papermill and the kernel."""
    t = Ticking(tmp_path, sigint_ignored=True)
    try:
        t.runner.send_signal(signal.SIGINT)
        _, err = t.runner.communicate(timeout=30)
        assert t.runner.returncode == 130 and "stopped by SIGINT" in err, err
        t.wait_gone()
    finally:
        t.kill_all()
    ticks = read_jsonl(t.ticks)  # whole records only
    assert [r["id"] for r in ticks] == list(range(len(ticks))) and len(ticks) >= 3


def test_after_sigkill_to_the_runner_a_second_one_is_refused_naming_what_holds_the_lock(tmp_path):
    """kill -9 of run_all.sh leaves papermill and its kernel running (and writing): a second run_all.sh is refused
    (exit 75) naming them, not the dead runner as if it held the lock."""
    t = Ticking(tmp_path)
    try:
        os.kill(t.runner.pid, signal.SIGKILL)
        t.runner.wait()
        n = len(read_jsonl(t.ticks))
        second = subprocess.run(t.argv(), env=t.env, capture_output=True, text=True, timeout=60)
        assert second.returncode == 75, second.stderr
        assert f"run_all.sh PID {t.runner.pid} took it and is gone" in second.stderr
        assert f"PID {t.papermill}: " in second.stderr and f"PID {t.kernel}: " in second.stderr, second.stderr
        assert f"kill {t.papermill} " in second.stderr or f"kill {t.kernel} " in second.stderr
        assert len(read_jsonl(t.ticks)) > n  # the orphans still write: that is why the second run was refused
    finally:
        t.kill_all()
        t.wait_gone()
    ticks = read_jsonl(t.ticks)
    assert [r["id"] for r in ticks] == list(range(len(ticks)))  # nothing lost or doubled


@pytest.fixture
def sigint_raises():
    """SIGINT raises KeyboardInterrupt during the test, also when the suite was started with SIGINT ignored (then
    Python installs no handler of its own); the disposition before is restored after."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


class Held(Echo):
    """Echo's answers, but from call ``free + 1`` on each call sets ``held`` and waits for ``release``."""

    def __init__(self, free: int):
        self.free, self.calls = free, 0
        self.held, self.release = threading.Event(), threading.Event()

    def generate(self, prompts, params, max_new_tokens=None, desc=None):
        self.calls += 1
        if self.calls > self.free:
            self.held.set()
            assert self.release.wait(60)
        return super().generate(prompts, params, max_new_tokens, desc)


def test_interrupt_during_an_api_stage_returns_at_once_and_sends_nothing_after(tmp_path, sigint_raises):
    """Ctrl-C (SIGINT to the main thread) while the probe waits for a server that holds a request: the stage returns
    while the server still holds it (it does not wait for the requests in flight), the queued prompts are never
    sent, the answers that arrived are stored. Event-driven: the interrupt comes when the server holds a request."""
    prof = _probe_profile(tmp_path, **{"probe.lengths": [1000, 2000, 5000, 10000, 20000, 30000],
                                       "probe.templates": 4})  # 24 prompts
    backend = Held(free=2)
    before = set(threading.enumerate())
    out = tmp_path / "smoke" / "probe" / "api" / "paper" / "generations.jsonl"
    with serve(backend) as server:
        be = OpenAIBackend(server.model, base_url=server.url, concurrency=2, max_retries=5)
        main = threading.main_thread().ident

        def interrupt_when_held():  # a request held by the server, the two answered ones stored
            if backend.held.wait(60):
                deadline = time.monotonic() + 60
                while not (out.exists() and len(out.read_bytes().splitlines()) == 2) and time.monotonic() < deadline:
                    time.sleep(0.01)
                signal.pthread_kill(main, signal.SIGINT)

        threading.Thread(target=interrupt_when_held, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            run_probe(prof, "echo", "api", backend=be)
        assert server.health()["generating"]  # returned while the third request is still held by the server
        backend.release.set()
        # the stage's request threads: once they are all gone, nothing more can be sent
        deadline = time.monotonic() + 30
        while any(t.name.startswith("ThreadPoolExecutor") for t in set(threading.enumerate()) - before):
            assert time.monotonic() < deadline, "the stage's request threads did not end"
            time.sleep(0.05)
        assert server.requests <= 4  # 2 answered + at most 2 in flight (the concurrency): none of the 20 queued
    stored = read_jsonl(out)
    assert len(stored) == 2 and all(r["response"].startswith("An answer") for r in stored)


def _sigint_ignored(argv: list[str]) -> list[str]:
    """``argv`` run with SIGINT ignored, as a background job of a non-interactive shell starts (exec keeps it)."""
    return [sys.executable, "-c", "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
            "os.execvp(sys.argv[1], sys.argv[1:])", *argv]


def test_the_interrupt_tests_pass_when_the_suite_starts_with_sigint_ignored(tmp_path):
    """The interrupt test above and the serve CLI's test (which stops the server with SIGINT), in a pytest started
    with SIGINT ignored: both install what they rely on, so both pass."""
    shown = subprocess.run(_sigint_ignored([sys.executable, "-c", "import signal; "
                                            "print(signal.getsignal(signal.SIGINT) == signal.SIG_IGN)"]),
                           capture_output=True, text=True, timeout=60)
    assert shown.stdout.strip() == "True"  # the fault is planted
    tests = ["tests/test_faults.py::test_interrupt_during_an_api_stage_returns_at_once_and_sends_nothing_after",
             "tests/test_models_backends.py::test_serve_cli_serves_the_bundled_model_until_interrupted"]
    r = subprocess.run(_sigint_ignored([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                        "--basetemp", str(tmp_path / "pytest"), *tests]),
                       cwd=REPO_ROOT, capture_output=True, text=True, timeout=540)
    assert r.returncode == 0 and "2 passed" in r.stdout, r.stdout[-4000:] + r.stderr[-2000:]


def test_deadline_bounds_a_stage_call_and_errors_are_not_stored(tmp_path):
    prof = _probe_profile(tmp_path, **{"probe.lengths": [1000, 2000, 5000], "probe.templates": 2})  # 6 prompts
    with serve(Echo(), delay_s=0.6) as server:
        be = OpenAIBackend(server.model, base_url=server.url, concurrency=1, max_retries=0, deadline_s=1.5)
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match=r"probe \(api, paper\): [45] of 6 generations failed \(rerun to retry them\)"):
            run_probe(prof, "echo", "api", backend=be)
        assert time.monotonic() - t0 < 2.5 and server.requests <= 3
    assert len(read_jsonl(tmp_path / "smoke" / "probe" / "api" / "paper" / "generations.jsonl")) in (1, 2)
    assert be.request_timeout(100) == 60.0 + 100 / 10.0  # derived from max_tokens when timeout_s is None


def test_malformed_json_is_retried_then_recorded_as_an_error(tmp_path):
    with serve(Echo(), malformed_first=2) as server:
        be = OpenAIBackend(server.model, base_url=server.url, max_retries=3, backoff_s=0.01)
        g = be.generate(["Say hi."], GenParams(max_new_tokens=4))[0]
        assert g.error is None and g.text.startswith("An answer") and server.requests == 3
        server.requests, server.malformed_first = 0, 100
        prof = _probe_profile(tmp_path)
        be1 = OpenAIBackend(server.model, base_url=server.url, max_retries=1, backoff_s=0.01)
        with pytest.raises(RuntimeError, match="JSONDecodeError"):
            run_probe(prof, "echo", "api", backend=be1)
        assert server.requests == 2  # one try and one retry
        path = tmp_path / "smoke" / "probe" / "api" / "paper" / "generations.jsonl"
        assert not path.exists() or read_jsonl(path) == []  # an error is not a result
        server.malformed_first = 0
        assert len(run_probe(prof, "echo", "api", backend=be1)) == 1  # the rerun retries it


def _hanging_server():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    conns = []
    stop = threading.Event()

    def accept():
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(sock.accept()[0])  # accepted, never answered
            except OSError:
                pass

    threading.Thread(target=accept, daemon=True).start()
    return sock, stop, conns


def test_download_that_never_answers_fails_within_its_timeout(tmp_path, monkeypatch):
    monkeypatch.delenv("LWLIB_DATA_DIR", raising=False)
    monkeypatch.setenv("LWLIB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "REPO_ROOT", tmp_path / "repo")  # no ../shared/data beside it
    sock, stop, _ = _hanging_server()
    try:
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/evaluation/"
        monkeypatch.setattr(data, "BASE_URL", url)
        t0 = time.monotonic()
        with pytest.raises(FileNotFoundError) as e:
            data.data_file("longwrite_ruler.jsonl", timeout_s=1.0)
        assert time.monotonic() - t0 < 4
        assert url + "longwrite_ruler.jsonl" in str(e.value) and "no answer within 1 s" in str(e.value)
        assert not list((tmp_path / "cache" / "data").glob("*"))  # no partial file left
    finally:
        stop.set()
        sock.close()


def test_item_counts_official_download_error_user_subset_warning(tmp_path, monkeypatch):
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    official = (Path(os.environ["LWLIB_DATA_DIR"]) / "longwrite_ruler.jsonl").read_text().splitlines()

    class Short(BaseHTTPRequestHandler):
        def do_GET(self):
            body = ("\n".join(official[:3]) + "\n").encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Short)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        monkeypatch.delenv("LWLIB_DATA_DIR", raising=False)
        monkeypatch.setenv("LWLIB_CACHE", str(tmp_path / "cache"))
        monkeypatch.setattr(data, "REPO_ROOT", tmp_path / "repo")
        monkeypatch.setattr(data, "BASE_URL", f"http://127.0.0.1:{srv.server_address[1]}/")
        with pytest.raises(ValueError, match=r"longwrite_ruler\.jsonl has 3 items, the official file has 48"):
            data.data_file("longwrite_ruler.jsonl", timeout_s=5)
        assert not list((tmp_path / "cache" / "data").glob("*"))
    finally:
        srv.shutdown()
        srv.server_close()
        monkeypatch.undo()
    mine = tmp_path / "my_ruler.jsonl"
    mine.write_text("\n".join(official[:5]) + "\n")
    with pytest.warns(UserWarning, match=rf"{mine}: 5 items where the official longwrite_ruler\.jsonl has 48"):
        assert len(data.load_ruler(mine)) == 5
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(data.load_ruler()) == 48  # the official file: no word


# ------------------------------------------------------------------------------------- the store's edges (issue 29)


def _store_with(tmp_path: Path, n: int = 3) -> tuple[Path, list[dict]]:
    path = tmp_path / "stage" / "records.jsonl"
    store = JsonlStore(path, fingerprint={"model": "m"})
    recs = [{"id": i, "text": f"record {i}"} for i in range(n)]
    store.extend(recs)
    return path, recs


def test_a_complete_bad_last_line_is_an_error_only_a_line_without_its_newline_is_torn(tmp_path):
    path, recs = _store_with(tmp_path)
    good = path.read_bytes()
    path.write_bytes(good + b'{"id": 3, "text": "cut by a crash\n')  # complete (newline-ended) but not JSON
    with pytest.raises(ValueError, match=rf"{path}:4: not valid JSON .*ends with a newline.*not a torn write"):
        JsonlStore(path, fingerprint={"model": "m"})
    with pytest.raises(ValueError, match=rf"{path}:4: not valid JSON"):
        read_records(path)
    assert path.read_bytes() == good + b'{"id": 3, "text": "cut by a crash\n'  # nothing cut: the line is evidence
    path.write_bytes(good + b'{"id": 3, "text": "cut by a cra')  # no newline: a torn write, dropped
    store = JsonlStore(path, fingerprint={"model": "m"})
    assert store.dropped_torn_line and store.records() == recs and path.read_bytes() == good
    path.write_bytes(good + '{"id": 3, "text": "caf\u00e9"}'.encode()[:-3])  # torn inside a UTF-8 sequence
    assert JsonlStore(path, fingerprint={"model": "m"}).records() == recs and path.read_bytes() == good


def test_invalid_utf8_names_the_file_and_line(tmp_path):
    path, recs = _store_with(tmp_path)
    good = path.read_bytes()
    path.write_bytes(good.replace(b"record 1", b"record \xff"))
    with pytest.raises(ValueError, match=rf"{path}:2: not valid JSON \(not UTF-8: invalid start byte"):
        JsonlStore(path, fingerprint={"model": "m"})
    assert path.read_bytes() == good.replace(b"record 1", b"record \xff")  # left as it was
    official = (Path(os.environ["LWLIB_DATA_DIR"]) / "longwrite_ruler.jsonl").read_bytes().splitlines(keepends=True)
    mine = tmp_path / "ruler.jsonl"
    mine.write_bytes(b"".join(official[:4]) + official[4].replace(b'"', b'\xc3"', 1) + b"".join(official[5:]))
    with pytest.raises(ValueError, match=rf"{mine}:5: not UTF-8"), pytest.warns(UserWarning, match="not the official"):
        data.load_ruler(mine)


def test_overwrite_never_overwrites_an_earlier_set_aside_file(tmp_path):
    """a (settings A) -> overwrite to B -> overwrite back to A -> overwrite to B again: A's records are set aside
    twice under the same fingerprint; both sets survive."""
    path = tmp_path / "stage" / "records.jsonl"
    fa, fb = {"model": "m", "t": 0.5}, {"model": "m", "t": 0.9}
    JsonlStore(path, fingerprint=fa).extend([{"id": 1, "v": "a1"}, {"id": 2, "v": "a1"}])
    with pytest.warns(UserWarning, match="moved aside"):
        JsonlStore(path, fingerprint=fb, overwrite=True).append({"id": 1, "v": "b"})
    with pytest.warns(UserWarning, match="moved aside"):
        JsonlStore(path, fingerprint=fa, overwrite=True).extend([{"id": 1, "v": "a2"}, {"id": 3, "v": "a2"}])
    with pytest.warns(UserWarning, match="moved aside"):
        store = JsonlStore(path, fingerprint=fb, overwrite=True)
    first = path.with_name(f"records.jsonl.stale-{fingerprint_id(fa)}")
    assert store.moved_aside == first.with_name(first.name + "-2")
    assert read_jsonl(first) == [{"id": 1, "v": "a1"}, {"id": 2, "v": "a1"}]  # the earlier set is still there
    assert read_jsonl(store.moved_aside) == [{"id": 1, "v": "a2"}, {"id": 3, "v": "a2"}]
    assert read_fingerprint(first) == read_fingerprint(store.moved_aside) == fa
    assert read_jsonl(path.with_name(f"records.jsonl.stale-{fingerprint_id(fb)}")) == [{"id": 1, "v": "b"}]
    assert not path.exists() and read_fingerprint(path) == fb  # the store starts empty under B


def _enospc_after(monkeypatch, path: Path, nbytes: int, truncate_fails: bool = False):
    """``os.write`` to ``path`` writes ``nbytes`` bytes, then fails with ENOSPC (a disk that fills mid-line);
    ``truncate_fails``: cutting the file back fails too."""
    import errno

    real_write, real_ftruncate = os.write, os.ftruncate
    ino = path.stat().st_ino
    left = [nbytes]

    def write(fd, data):
        if os.fstat(fd).st_ino != ino:
            return real_write(fd, data)
        if left[0] <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = real_write(fd, bytes(data[: left[0]]))
        left[0] -= n
        return n

    def ftruncate(fd, size):
        if truncate_fails and os.fstat(fd).st_ino == ino:
            raise OSError(errno.EIO, "Input/output error")
        return real_ftruncate(fd, size)

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "ftruncate", ftruncate)


def test_a_failed_append_is_rolled_back_and_the_next_append_is_whole(tmp_path, monkeypatch):
    path, recs = _store_with(tmp_path)
    store = JsonlStore(path, fingerprint={"model": "m"})
    good = path.read_bytes()
    with monkeypatch.context() as m:
        _enospc_after(m, path, 10)
        with pytest.raises(OSError, match=rf"{path}: appending record 3 failed \(No space left on device\); rolled "
                                          r"back to its last complete record") as e:
            store.append({"id": 3, "text": "record 3"})
    assert e.value.errno == 28 and path.read_bytes() == good and 3 not in store
    store.append({"id": 3, "text": "record 3"})  # space again: whole, on a line of its own
    assert JsonlStore(path, fingerprint={"model": "m"}).records() == recs + [{"id": 3, "text": "record 3"}]

    with monkeypatch.context() as m:  # the rollback fails too: the store refuses to glue anything on
        _enospc_after(m, path, 10, truncate_fails=True)
        with pytest.raises(OSError, match=rf"{path}: appending record 4 failed .*cutting the partial line off failed"):
            store.append({"id": 4, "text": "record 4"})
    with pytest.raises(OSError, match="no further appends from this store"):
        store.append({"id": 5, "text": "record 5"})
    reopened = JsonlStore(path, fingerprint={"model": "m"})  # the partial line has no newline: dropped as torn
    assert reopened.dropped_torn_line and reopened.records() == recs + [{"id": 3, "text": "record 3"}]


def test_enospc_in_a_whole_file_write_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    import errno

    from lwlib.runs import atomic_write_json

    target = atomic_write_json(tmp_path / "summary.json", {"old": 1})

    def fsync(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError, match=rf"writing {target} failed \(No space left on device\); the file is as it was"):
        atomic_write_json(target, {"new": 2})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"old": 1} and [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_a_given_data_path_that_does_not_exist_is_an_error_not_a_fallback(tmp_path):
    for given, words in [(tmp_path / "nope.jsonl", "nope.jsonl does not exist"),
                         (tmp_path, f"the folder {tmp_path} has no longwrite_ruler.jsonl")]:
        prof = _probe_profile(tmp_path, **{"probe.data_path": str(given)})
        with pytest.raises(FileNotFoundError, match=rf"probe\.data_path: .*{re.escape(words)}.*no fallback"):
            run_probe(prof, prof.model, "base", backend=Counting())
    assert not (tmp_path / "smoke" / "probe" / "base").exists()  # no manifest naming a file that is not there


def test_a_wrong_checksum_where_the_official_file_is_looked_for_is_an_error(tmp_path, monkeypatch):
    official = Path(os.environ["LWLIB_DATA_DIR"]) / "longwrite_ruler.jsonl"
    changed = tmp_path / "data" / "longwrite_ruler.jsonl"
    changed.parent.mkdir()
    changed.write_bytes(official.read_bytes().replace(b"1000", b"1001", 1))  # same item count, one number changed
    monkeypatch.setenv("LWLIB_DATA_DIR", str(changed.parent))
    prof = _probe_profile(tmp_path)
    with pytest.raises(ValueError, match=rf"{changed}: not the official file: longwrite_ruler\.jsonl has 48 items, the "
                                         r"official file has 48; its sha256 is"):
        run_probe(prof, prof.model, "base", backend=Counting())
    assert not (tmp_path / "smoke" / "probe").exists()
    with pytest.warns(UserWarning, match="not the official"):  # given as one's own file, it is used
        assert len(data.load_ruler(changed)) == 48


def test_dtype_and_device_are_part_of_the_fingerprint(tmp_path):
    be = Counting()
    prof = _probe_profile(tmp_path)  # smoke: dtype auto -> float32 on this CPU
    run_probe(prof, prof.model, "base", backend=be)
    path = tmp_path / "smoke" / "probe" / "base" / "paper" / "generations.jsonl"
    before = path.read_bytes()
    assert {k: read_fingerprint(path)[k] for k in ("device", "dtype")} == prof.numerics()
    bf16 = _probe_profile(tmp_path, dtype="bfloat16")
    with pytest.raises(StaleRunError, match='dtype: "float32" -> "bfloat16"'):
        run_probe(bf16, bf16.model, "base", backend=be)
    assert path.read_bytes() == before and be.prompts == 1
    same = _probe_profile(tmp_path, dtype="float32", device="cpu")  # what auto resolved to: the same records
    assert len(run_probe(same, same.model, "base", backend=be)) == 1 and be.prompts == 1


def test_negative_sizes_fail_the_profile_check(capsys):
    from lwlib import config

    sets = ["probe.templates=-1", "probe.max_new_tokens=-5", "bench.max_items=-3", "dpo.samples=-2",
            "sft.per_device_batch_size=0", "agentwrite.max_steps=-1", "nll.max_samples=-4",
            "probe.backend.concurrency=0", "bench.judge.max_tokens=-1"]
    for item in sets:
        assert config.main(["check", "smoke", "--set", item]) == 2, item
        key, value = item.split("=")
        err = capsys.readouterr().err
        assert f"error: --set {item}: " in err and f"{key.split('.')[-1]} must be >= " in err and value in err, err
    assert config.main(["check", "smoke", "--set", "name=../x"]) == 2
    assert "error: --set name=../x: name must be letters, digits and ._-" in capsys.readouterr().err


def test_a_lock_whose_taker_died_names_the_child_that_holds_it(tmp_path):
    """The process that took a folder's lock forked (a worker that inherited the lock) and died: the lock file
    names the dead one; the error names the live holder."""
    folder = tmp_path / "stage"
    code = ("import os, sys, time\nfrom lwlib.runs import lock_dir\nlock_dir(sys.argv[1])\n"
            "if os.fork():\n    os._exit(0)\nprint(os.getpid(), flush=True)\ntime.sleep(60)\n")
    taker = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True,
                             cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    child = int(taker.stdout.readline())
    taker.wait()
    try:
        with pytest.raises(RunLockedError, match=rf"written by PID {child} \(.*python.*\), left running by PID "
                                                 rf"{taker.pid} \(gone") as e:
            JsonlStore(folder / "records.jsonl", fingerprint={"model": "m"})
        assert e.value.pid == child and f"kill {child}" in str(e.value)
    finally:
        os.kill(child, signal.SIGKILL)


def test_run_all_does_not_point_at_a_cut_off_executed_notebook(tmp_path):
    """A full disk cuts the executed copy off: the failure message says so instead of sending the reader to it."""
    import nbformat.v4 as nbf

    nb = nbf.new_notebook(cells=[nbf.new_code_cell('profile = "x"', metadata={"tags": ["parameters"]})])
    repo = fake_repo(tmp_path, notebooks={"01_x.ipynb": nb})
    python = repo / ".venv" / "bin" / "python"
    python.unlink()  # a python whose lwlib.nbrun fills the disk: a cut-off copy and ENOSPC
    python.write_text(f'''#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "lwlib.nbrun" ]; then
  printf '{{"cells": [{{"cell_type": "code", "sou' > "$4"
  echo "OSError: [Errno 28] No space left on device" >&2
  exit 1
fi
exec {sys.executable} "$@"
''')
    python.chmod(0o755)
    (tmp_path / "p.yaml").write_text("name: cut\nmodel: none\n")
    r = subprocess.run([str(repo / "run_all.sh"), str(tmp_path / "p.yaml")], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "LWLIB_RUNS": str(tmp_path / "runs"),
                                         "PYTHONPATH": str(REPO_ROOT)})
    out = tmp_path / "runs" / "cut" / "notebooks" / "01_x.ipynb"
    assert r.returncode == 1 and "No space left on device" in r.stderr
    assert f"No readable executed copy: {out} is missing or cut off" in r.stderr, r.stderr
    assert "The executed copy, with the error in it" not in r.stderr
