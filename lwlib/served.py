"""An inference server process started for one model, for the OpenAI-compatible backend (``kind: server``).

Generation for 8-9B models with 32k-token outputs (the ``paper`` profile) belongs in an inference server with paged
attention and continuous batching, not in transformers ``generate`` at batch 8. A stage that needs a model
(the probe, LongBench-Write predictions, DPO sampling) builds its backend with ``make_backend``; with
``backend.kind: server`` that is a :class:`lwlib.backends.ServedBackend`: it starts the profile's server command
for that model here (:class:`ServerProcess`; vLLM by default, SGLang or ``lwlib.serve`` by changing
``server_command``), waits until ``GET /v1/models`` answers, sends the requests as
:class:`lwlib.backends.OpenAIBackend` does, and stops the server when the stage releases the backend
(``lwlib.backends.release``) or the process exits. This module manages the process only (it imports nothing of
lwlib, so that lwlib.backends can import it). One server per model, so base, SFT and DPO checkpoints each get
theirs in turn and nothing has to be started by hand.

The command is a list of arguments with placeholders: ``{model}`` (the model path or id), ``{port}`` (a free port
chosen here), ``{gpus}`` (the visible CUDA devices, at least 1), ``{python}`` (this process's interpreter, so that
a server written in Python runs in the same environment: :data:`LWLIB_SERVE_COMMAND`). The defaults:

- vLLM (:data:`VLLM_COMMAND`): ``vllm serve {model} --served-model-name {model} --port {port}
  --data-parallel-size {gpus} --seed 0`` (one replica per GPU for an 8-9B model; use ``--tensor-parallel-size``
  for larger ones). vLLM's ``--generation-config`` default reads the model's own sampling defaults; the requests
  set temperature and top_p explicitly, so the paper's decoding is what runs.
- SGLang (:data:`SGLANG_COMMAND`): ``python -m sglang.launch_server --model-path {model} --served-model-name
  {model} --port {port} --dp-size {gpus}``.
- lwlib.serve (:data:`LWLIB_SERVE_COMMAND`): ``{python} -m lwlib.serve --model {model} --port {port}``, this
  project's own server (one request at a time; the ``paper_rehearsal`` profile's stand-in for vLLM on one GPU,
  with ``--engine slots --kv-cache-gb 2`` added).

A repetition penalty (the ``loopfree`` decoding) is not sent: OpenAI-compatible servers apply theirs to the
prompt too; the ``paper`` profile uses the paper's decoding only.

Usage::

    be = ServedBackend("runs/paper/sft/model", command=VLLM_COMMAND)   # lwlib.backends: starts vllm, waits
    outs = be.generate(["Write a 10000-word story."], GenParams(32768))
    be.close()                                                          # stops the server
    proc = ServerProcess("runs/paper/sft/model", VLLM_COMMAND)          # the process alone (proc.base_url)
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

VLLM_COMMAND = ["vllm", "serve", "{model}", "--served-model-name", "{model}", "--port", "{port}",
                "--data-parallel-size", "{gpus}", "--seed", "0"]
SGLANG_COMMAND = ["python", "-m", "sglang.launch_server", "--model-path", "{model}", "--served-model-name", "{model}",
                  "--port", "{port}", "--dp-size", "{gpus}"]
LWLIB_SERVE_COMMAND = ["{python}", "-m", "lwlib.serve", "--model", "{model}", "--port", "{port}"]
_RUNNING: set[ServerProcess] = set()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def visible_gpus() -> int:
    """CUDA devices this process sees (at least 1, so a command that needs a count gets one)."""
    try:
        import torch

        return max(1, torch.cuda.device_count())
    except Exception:  # noqa: BLE001 - no torch/CUDA: one
        return 1


def server_argv(command: Sequence[str], model: str, port: int, gpus: int) -> list[str]:
    """``command`` with ``{model}``, ``{port}``, ``{gpus}`` and ``{python}`` (``sys.executable``) filled in
    (ValueError names an unknown placeholder)."""
    try:
        return [str(a).format(model=model, port=port, gpus=gpus, python=sys.executable) for a in command]
    except (KeyError, IndexError) as e:
        raise ValueError(f"backend.server_command: unknown placeholder {e} in {list(command)} "
                         "(known: {model}, {port}, {gpus}, {python})") from None


class ServerProcess:
    """An inference server process started for ``model`` (``command`` with its placeholders filled) and stopped in
    :meth:`close`; :class:`lwlib.backends.ServedBackend` talks to it at :attr:`base_url`.

    The server's output goes to ``log_path`` (default: a temporary file, named in errors). Startup waits up to
    ``ready_timeout_s`` for ``GET /v1/models``; a server that exits first raises ``RuntimeError`` with the last
    lines of its log, and so does one that does not answer in time (it is stopped first).

    Usage: ``proc = ServerProcess("runs/paper/sft/model", VLLM_COMMAND); ...; proc.close()``
    """

    def __init__(self, model: str, command: Sequence[str] = VLLM_COMMAND, ready_timeout_s: float = 1800.0,
                 log_path: str | Path | None = None, env: dict[str, str] | None = None):
        self.port = free_port()
        self.argv = server_argv(command, model, self.port, visible_gpus())
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="lwlib-server-", suffix=".log")
            os.close(fd)
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc: subprocess.Popen | None = None
        try:
            self.proc = subprocess.Popen(self.argv, stdout=self._log, stderr=subprocess.STDOUT,
                                         start_new_session=True, env={**os.environ, **(env or {})})
        except OSError as e:
            self._log.close()
            raise RuntimeError(f"backend kind server: cannot start {self.argv[0]!r} ({e}); install it (vLLM: pip "
                               "install vllm) or set backend.server_command") from None
        _RUNNING.add(self)
        try:
            self._wait_ready(ready_timeout_s)
        except BaseException:
            self.close()
            raise

    def _log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def _wait_ready(self, timeout_s: float) -> None:
        end = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"backend kind server: {' '.join(self.argv)} exited with status "
                                   f"{self.proc.returncode} before it answered (log {self.log_path}):\n"
                                   f"{self._log_tail()}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError, ValueError):
                pass
            if time.monotonic() > end:
                raise RuntimeError(f"backend kind server: {' '.join(self.argv)} did not answer on {self.base_url} "
                                   f"within {timeout_s:.0f} s (log {self.log_path}):\n{self._log_tail()}")
            time.sleep(0.5)

    def close(self, grace_s: float = 30.0) -> None:
        """Stop the server (SIGTERM to its process group, SIGKILL after ``grace_s``); idempotent."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=grace_s)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
        if not self._log.closed:
            self._log.close()
        _RUNNING.discard(self)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@atexit.register
def _stop_all() -> None:  # no server outlives the process that started it
    for proc in list(_RUNNING):
        proc.close(grace_s=5.0)
