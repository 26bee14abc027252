"""``backend.kind: server`` (lwlib.served): a server process started for the stage's model, used through the
OpenAI-compatible backend and stopped on release. The real path runs on the bundled model with ``lwlib.serve`` as
the server command (vLLM and SGLang take the same place on GPU machines)."""

from __future__ import annotations

import sys

import pytest

from lwlib.backends import BackendConfig, GenParams, ServedBackend, make_backend, release
from lwlib.served import LWLIB_SERVE_COMMAND, SGLANG_COMMAND, VLLM_COMMAND, server_argv

MODEL = "smollm2-135m-instruct"
LWLIB_SERVE = [*LWLIB_SERVE_COMMAND, "--device", "cpu", "--dtype", "float32"]  # {python}: this interpreter


@pytest.mark.parametrize("engine", ["generate", pytest.param("slots", marks=pytest.mark.slow)])
def test_server_is_started_for_the_model_answers_like_the_local_backend_and_is_stopped(tmp_path, local_backend,
                                                                                       engine):
    log = tmp_path / "server.log"
    command = [*LWLIB_SERVE, "--engine", engine, "--kv-cache-gb", "0.5"]
    be = make_backend(BackendConfig(kind="server", server_command=command, server_ready_s=300, server_log=str(log)),
                      MODEL)
    assert isinstance(be, ServedBackend) and be.running and be.model == MODEL
    try:
        p = GenParams(max_new_tokens=12, temperature=0.0)
        got = be.generate(["Name three colors.", "Say hi."], p)
        want = local_backend.generate(["Name three colors.", "Say hi."], p)
        assert [g.error for g in got] == [None, None]
        assert [g.text for g in got] == [g.text for g in want]  # greedy: the served model is the same model
        assert all(0 < g.completion_tokens <= 12 for g in got)
    finally:
        release(be)
    assert not be.running and be.proc.returncode is not None
    assert "lwlib.serve" in log.read_text()  # the server's own output went to the log
    release(be)  # idempotent


def test_server_that_exits_or_does_not_start_is_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match=r"exited with status 3 before it answered(.|\n)*boom"):
        ServedBackend(MODEL, command=[sys.executable, "-c", "print('boom', flush=True); raise SystemExit(3)"],
                      log_path=tmp_path / "a.log")
    with pytest.raises(RuntimeError, match="cannot start 'no-such-server-binary'.*server_command"):
        ServedBackend(MODEL, command=["no-such-server-binary", "{model}"], log_path=tmp_path / "b.log")
    with pytest.raises(RuntimeError, match="did not answer .* within 1 s"):
        ServedBackend(MODEL, command=[sys.executable, "-c", "import time; time.sleep(30)"], ready_timeout_s=1,
                      log_path=tmp_path / "c.log")


def test_server_commands_fill_their_placeholders():
    argv = server_argv(VLLM_COMMAND, "runs/paper/sft/model", 8123, 8)
    assert argv[:3] == ["vllm", "serve", "runs/paper/sft/model"]
    assert argv[argv.index("--port") + 1] == "8123" and argv[argv.index("--data-parallel-size") + 1] == "8"
    assert argv[argv.index("--served-model-name") + 1] == "runs/paper/sft/model"  # requests name the model so
    assert server_argv(SGLANG_COMMAND, "m", 1, 2)[-1] == "2"
    assert server_argv(LWLIB_SERVE_COMMAND, "m", 5, 1)[:3] == [sys.executable, "-m", "lwlib.serve"]
    with pytest.raises(ValueError, match=r"unknown placeholder 'gpu'"):
        server_argv(["serve", "{gpu}"], "m", 1, 1)


def test_paper_profile_serves_its_generation():
    from lwlib.config import load_profile

    prof = load_profile("paper")
    for section in ("probe", "bench", "dpo"):
        assert prof.data[section]["backend"]["kind"] == "server", section
