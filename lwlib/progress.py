"""Progress bars: tqdm's bars (widgets in a notebook, text in a terminal), and in a headless run one plain
line per tenth of each long step on the console.

Under papermill a notebook's output goes only into its executed copy; the console shows papermill's cell
counter, so a cell that runs for an hour looks stuck. When ``$LWLIB_CONSOLE_PROGRESS`` is set (``run_all.sh``
sets it to 1; ``0`` turns it off), every lwlib bar inside a Jupyter kernel also writes a line to the kernel
process's own stderr, which is the console ``run_all.sh`` runs in (the kernel inherits it from papermill; in
ipykernel ``sys.stderr.fileno()`` is that stream, not the notebook): at each 10% of the total, at least every
``$LWLIB_CONSOLE_PROGRESS_S`` seconds (default 60; also while a step makes no progress), and when the bar
closes::

    [lwlib 12:03:04] generate (smollm2-135m-instruct): 40% 8/20 [01:12<01:48]

Outside a kernel (a terminal, ``python -m lwlib.train``, pytest) the bar itself is on the console and no
extra line is written. (papermill's own ``--log-output`` was not used: it copies every cell output, tables
and all, to the console, while widget bars, which update through comm messages, would still show nothing.) Trainer runs get the same lines through :func:`console_callback`.

Usage::

    from .progress import tqdm
    for x in tqdm(items, desc="score", unit="item"): ...
    trainer.add_callback(console_callback())        # a no-op callback when console lines are off
"""

from __future__ import annotations

import io
import os
import sys
import threading
import time
import weakref
from typing import Any

from tqdm.auto import tqdm as _auto_tqdm


def console_fd() -> int | None:
    """The file descriptor console lines go to, or None when they are off: ``$LWLIB_CONSOLE_PROGRESS`` unset
    or ``0``, or not inside a Jupyter kernel."""
    if os.environ.get("LWLIB_CONSOLE_PROGRESS", "0") in ("", "0", "false", "no"):
        return None
    if not type(sys.stderr).__module__.startswith("ipykernel"):
        return None
    try:
        return sys.stderr.fileno()  # ipykernel's copy of the process's original stderr
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        # no fd capture: fd 2 was never redirected into the notebook
        return sys.__stderr__.fileno() if sys.__stderr__ is not None else None


_OPEN: weakref.WeakSet[ConsoleLines] = weakref.WeakSet()  # bars with console lines, for the heartbeat thread
_HEARTBEAT: list[threading.Thread] = []
HEARTBEAT_S = 5.0


def _heartbeat() -> None:
    while True:
        time.sleep(HEARTBEAT_S)
        for c in list(_OPEN):
            c.update(c.n)  # writes a line when every_s passed without one (a long batch between updates)


class ConsoleLines:
    """Decides when a progress line is due (each new tenth, every ``every_s`` seconds, the end) and writes it.

    With a file descriptor, a daemon thread re-checks open bars every 5 s, so a step that makes no progress
    for minutes (one long generate batch) still prints a line every ``every_s`` seconds."""

    def __init__(self, desc: str, total: float | None, fd: int | None, every_s: float | None = None):
        self.desc, self.total, self.fd = desc or "progress", total, fd
        self.every_s = float(os.environ.get("LWLIB_CONSOLE_PROGRESS_S", 60)) if every_s is None else every_s
        self.start = self.last = time.monotonic()
        self.tenth = 0
        self.n: float = 0
        self.done = False
        self._lock = threading.Lock()
        if fd is not None:
            _OPEN.add(self)
            if not _HEARTBEAT:
                _HEARTBEAT.append(threading.Thread(target=_heartbeat, name="lwlib-progress", daemon=True))
                _HEARTBEAT[0].start()

    def line(self, n: float, final: bool = False, extra: str = "") -> str:
        elapsed = time.monotonic() - self.start
        if self.total:
            frac = min(n / self.total, 1.0)
            eta = elapsed * (1 - frac) / frac if frac > 0 else None
            body = f"{frac:4.0%} {n:g}/{self.total:g} [{_hms(elapsed)}<{_hms(eta) if eta is not None else '?'}]"
        else:
            body = f"{n:g} [{_hms(elapsed)}]"
        if final:
            body += " done"
        return f"[lwlib {time.strftime('%H:%M:%S')}] {self.desc}: {body}{extra}"

    def update(self, n: float, extra: str = "") -> str | None:
        """The line to write now for progress ``n``, or None."""
        with self._lock:
            self.n = n
            if self.done:
                return None
            if self.total and n >= self.total:
                return None  # the closing line reports the end
            now = time.monotonic()
            tenth = int(10 * n / self.total) if self.total else 0
            if tenth > self.tenth or now - self.last >= self.every_s:
                self.tenth, self.last = max(tenth, self.tenth), now
                return self.emit(self.line(n, extra=extra))
            return None

    def close(self, n: float, extra: str = "") -> str | None:
        with self._lock:
            if self.done:
                return None
            self.done = True
            _OPEN.discard(self)
            return self.emit(self.line(n, final=True, extra=extra))

    def emit(self, text: str) -> str:
        if self.fd is not None:
            try:
                # on a terminal, replace the line papermill's cell counter is drawing on (it redraws at the
                # next cell); in a log, just a line
                out = ("\r\x1b[K" if os.isatty(self.fd) else "") + text + "\n"
                os.write(self.fd, out.encode("utf-8", "replace"))
            except OSError:
                self.fd = None
        return text


def _hms(s: float) -> str:
    s = int(s)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60:02d}:{s % 60:02d}"


class tqdm(_auto_tqdm):  # noqa: N801 (tqdm's own name)
    """``tqdm.auto.tqdm`` that also writes console lines in a headless run (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        fd = None if self.disable else console_fd()
        self._console = ConsoleLines(self.desc, self.total, fd) if fd is not None else None

    def update(self, n: float = 1) -> bool | None:
        out = super().update(n)
        if self._console is not None:
            self._console.update(self.n)
        return out

    def close(self) -> None:
        console = getattr(self, "_console", None)
        if console is not None and not self.disable:
            console.close(self.n)
        super().close()


def console_callback(desc: str = "training steps") -> Any:
    """A ``transformers.TrainerCallback`` writing console lines per tenth of the optimizer steps (with the last
    logged loss); it does nothing when console lines are off. ``trainer.add_callback(console_callback("sft"))``."""
    from transformers import TrainerCallback

    class ConsoleProgress(TrainerCallback):
        def __init__(self) -> None:
            self.lines: ConsoleLines | None = None
            self.loss = ""

        def on_train_begin(self, args, state, control, **kw):
            fd = console_fd()
            if fd is not None and state.is_world_process_zero:
                self.lines = ConsoleLines(desc, state.max_steps or None, fd)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                self.loss = f", loss {float(logs['loss']):.4g}"

        def on_step_end(self, args, state, control, **kw):
            if self.lines is not None:
                self.lines.update(state.global_step, self.loss)

        def on_train_end(self, args, state, control, **kw):
            if self.lines is not None:
                self.lines.close(state.global_step, self.loss)

    return ConsoleProgress()
