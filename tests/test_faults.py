"""Fault injection (issue 19): results cannot go stale or doubled, and stopping stops. Loopback only, bounded in time.

Config change between runs (refused, nothing mixed), two writers (second refused, named), SIGTERM to the runner
(nothing left running, no record after), an interrupt during an API stage (returns at once, nothing sent after),
a download that never answers, malformed JSON from the server (retried, then an error that is not stored).
"""

from __future__ import annotations

import json
import os
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
from lwlib.runs import REPO_ROOT, JsonlStore, RunLockedError, StaleRunError, read_jsonl
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


def test_sigterm_stops_the_runner_papermill_and_the_kernel_and_a_second_runner_is_refused(tmp_path):
    """run_all.sh with real papermill and a real kernel on a tiny notebook that appends a record every 25 ms."""
    repo = fake_repo(tmp_path, notebooks={"01_tick.ipynb": _tick_notebook()})
    prof_file = tmp_path / "tick.yaml"
    prof_file.write_text("name: ticks\nmodel: none\n")
    run = tmp_path / "runs" / "ticks"
    env = {**os.environ, "LWLIB_RUNS": str(tmp_path / "runs"), "PYTHONPATH": str(REPO_ROOT)}
    runner = subprocess.Popen([str(repo / "run_all.sh"), str(prof_file)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, start_new_session=True)
    ticks = run / "tick" / "ticks.jsonl"
    try:
        t0 = time.monotonic()
        while not (ticks.exists() and len(ticks.read_text().splitlines()) >= 3 and (run / "kernel.pid").exists()):
            assert runner.poll() is None, runner.communicate()
            assert time.monotonic() - t0 < 90, "the kernel did not start"
            time.sleep(0.1)
        kernel, papermill = map(int, (run / "kernel.pid").read_text().split())
        second = subprocess.run([str(repo / "run_all.sh"), str(prof_file)], env=env, capture_output=True, text=True,
                                timeout=60)
        assert second.returncode == 75 and f"PID {runner.pid}" in second.stderr, second.stderr
        with pytest.raises(RunLockedError, match=f"PID {kernel}"):  # and in Python, the kernel holds the stage
            JsonlStore(ticks, fingerprint={"k": 1})

        runner.send_signal(signal.SIGTERM)
        t_sig = time.monotonic()
        _, err = runner.communicate(timeout=15)
        assert runner.returncode == 143 and "stopped by SIGTERM" in err, err
        assert time.monotonic() - t_sig < 8
        deadline = time.monotonic() + 3
        while (_alive(kernel) or _alive(papermill)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(kernel) and not _alive(papermill)
        n = len(read_jsonl(ticks))
        time.sleep(1.0)
        assert len(read_jsonl(ticks)) == n  # no record after the runner returned
    finally:
        if runner.poll() is None:
            os.killpg(runner.pid, signal.SIGKILL)
            runner.wait()
    # the lock went with the run: a new writer may start
    JsonlStore(ticks, fingerprint={"k": 1}).append({"id": "after"})


def test_interrupt_during_an_api_stage_returns_at_once_and_sends_nothing_after(tmp_path):
    """Ctrl-C (SIGINT to the main thread) while the probe talks to a slow server: the stage returns within a
    second or two, the queued requests are never sent, the answers that arrived are stored."""
    prof = _probe_profile(tmp_path, **{"probe.lengths": [1000, 2000, 5000, 10000, 20000, 30000],
                                       "probe.templates": 4})  # 24 prompts
    with serve(Echo(), delay_s=1.0) as server:
        be = OpenAIBackend(server.model, base_url=server.url, concurrency=2, max_retries=5)
        main = threading.main_thread().ident
        timer = threading.Timer(1.5, signal.pthread_kill, (main, signal.SIGINT))
        t0 = time.monotonic()
        timer.start()
        with pytest.raises(KeyboardInterrupt):
            run_probe(prof, "echo", "api", backend=be)
        returned = time.monotonic()
        sent = server.requests
        time.sleep(2.5)  # longer than the server's delay: anything still queued would have been sent by now
        assert server.requests == sent <= 6
        assert returned - t0 < 3.5
    stored = read_jsonl(tmp_path / "smoke" / "probe" / "api" / "paper" / "generations.jsonl")
    assert 1 <= len(stored) <= 2 and all(r["response"].startswith("An answer") for r in stored)


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
