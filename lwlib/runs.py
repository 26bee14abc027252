"""Run folders: resumable JSONL records, atomic files, and a manifest of what produced them.

Every stage writes under ``runs/<profile>/<stage>/``. Long stages append one JSON record per item as
soon as it is produced (flushed and fsynced), so a killed run resumes where it stopped: items whose
key is already in the file are skipped, a torn last line from a crash is dropped and reported.
Each store belongs to a *fingerprint* of the settings that decide its records (``<file>.fingerprint.json``):
reopening it under other settings raises :class:`StaleRunError` instead of mixing old and new records.
One process writes a folder at a time (:func:`lock_dir`; :class:`RunLockedError` names the other one).
Files written whole go through a temporary file and an atomic rename (:func:`atomic_write_bytes`,
:func:`atomic_write_text`, :func:`atomic_write_json`, :func:`atomic_write_jsonl`), so a crash never leaves a torn one.

Usage::

    store = JsonlStore(prof.stage_dir("probe") / "base" / "generations.jsonl", key="id",
                       fingerprint={"model": model, "max_new_tokens": 512}, stage="probe")
    for item in items:
        if item.id in store:          # already done in an earlier (interrupted) run
            continue
        store.append({"id": item.id, ...})
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent


class StaleRunError(ValueError):
    """A store's records were made with other settings than the ones asked for now (see :class:`JsonlStore`).

    ``changed`` maps each differing setting to ``(stored, asked)``."""

    def __init__(self, message: str, changed: dict[str, tuple[Any, Any]] | None = None):
        super().__init__(message)
        self.changed = changed or {}


class RunLockedError(RuntimeError):
    """Another live process writes to the folder (see :func:`lock_dir`); ``pid`` is the holder's, if known."""

    def __init__(self, message: str, pid: int | None = None):
        super().__init__(message)
        self.pid = pid


class JsonlStore:
    """An append-only JSONL file of records keyed by ``key``; reopening it resumes.

    A record whose key is already stored is refused (``ValueError``), so a resumed run cannot
    duplicate items; a file holding one key twice (two writers at once) is an error naming the file, both
    lines and the key. Lines that are not valid JSON (or not UTF-8) raise an error naming the file and line,
    except a torn last line: a last line *without its newline* that does not parse (what a crash mid-write
    leaves), which is cut from the file with a warning. A complete last line (newline-terminated) that does not
    parse is an error like any other. A last record without its newline gets one before the next append. An
    append that fails (a full disk: ENOSPC) is rolled back to the last complete record and raises an
    ``OSError`` naming the file; if even the rollback fails, the store refuses further appends (nothing is
    glued onto a partial line).

    ``fingerprint``: the settings that decide the records (model, decoding, data, seed; a flat or nested
    dict of JSON values). It is kept in ``<file>.fingerprint.json``; reopening with a fingerprint that
    differs in a setting both name raises :class:`StaleRunError` naming each change (old -> new) and how to
    proceed, so records of two configurations are never mixed. With ``overwrite=True`` the old records are
    moved aside to ``<file>.stale-<id>`` (``<id>``: the old fingerprint's; ``<file>.stale-<id>-2``, ``-3`` ... when
    that name is taken: a set-aside file is never overwritten), their fingerprint beside them, and the store
    starts empty.
    Records written before fingerprints existed (no fingerprint file) are adopted with a warning, and so
    are settings the stored fingerprint lacks (added to the code later). ``stage`` names the profile
    section for the message (``probe`` -> "set probe.overwrite: true").

    A store given a fingerprint, and any store once it appends, holds the lock of its folder
    (:func:`lock_dir`) for the rest of the process: a second process writing there is refused
    (:class:`RunLockedError`) instead of storing every record twice.

    Usage: ``JsonlStore(out / "generations.jsonl", key="id", fingerprint={"model": m, "temperature": 0.5},
    stage="probe")``
    """

    def __init__(self, path: str | Path, key: str = "id", fingerprint: dict | None = None,
                 overwrite: bool = False, stage: str | None = None):
        self.path = Path(path)
        self.key = key
        self.stage = stage
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._records: dict[Any, dict] = {}
        self.dropped_torn_line = False
        self.moved_aside: Path | None = None
        self._unusable: str | None = None  # why appends are refused (a failed append that could not be undone)
        if fingerprint is not None:
            lock_dir(self.path.parent)
        if self.path.exists():
            self._records, self.dropped_torn_line = _parse_records(self.path, key, repair=True)
        if fingerprint is not None:
            self._check_fingerprint(fingerprint, overwrite)

    @property
    def fingerprint_path(self) -> Path:
        return fingerprint_path(self.path)

    def _check_fingerprint(self, fingerprint: dict, overwrite: bool) -> None:
        new = _canonical(fingerprint)
        old = read_fingerprint(self.path)
        if not self._records:  # nothing to protect: this configuration owns the file from now on
            _write_fingerprint(self.path, new)
            return
        if old is None:
            _warn(f"{self.path}: {len(self._records)} records without a fingerprint (written before lwlib "
                  f"recorded one); adopting them as made with the current settings")
            _write_fingerprint(self.path, new)
            return
        flat_old, flat_new = _flatten(old), _flatten(new)
        changed = {k: (flat_old[k], flat_new[k]) for k in flat_old if k in flat_new and flat_old[k] != flat_new[k]}
        if changed and overwrite:
            aside = _move_aside(self.path, f"{self.path.name}.stale-{fingerprint_id(old)}")
            _warn(f"{self.path}: {len(self._records)} records made with other settings "
                  f"({_describe(changed)}) moved aside to {aside.name} (overwrite)")
            self._records, self.moved_aside = {}, aside
            _write_fingerprint(self.path, new)
            return
        if changed:
            where = f"{self.stage}.overwrite: true" if self.stage else "overwrite=True"
            raise StaleRunError(
                f"{self.path} holds {len(self._records)} records made with other settings: {_describe(changed)}. "
                f"Records of two configurations are never mixed: use a new run name (the profile's `name` field), "
                f"or set {where} (the old records are moved aside), or delete {self.path}.", changed)
        added = sorted(set(flat_new) - set(flat_old))
        if added or set(flat_old) - set(flat_new):
            if added:
                _warn(f"{self.path}: settings {added} are not in the stored fingerprint (recorded before they "
                      f"were); adopting the records as made with {[flat_new[k] for k in added]}")
            _write_fingerprint(self.path, new)

    def __contains__(self, key: Any) -> bool:
        return _hashable(key) in self._records

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[dict]:
        return iter(self._records.values())

    def get(self, key: Any, default: Any = None) -> dict | None:
        return self._records.get(_hashable(key), default)

    def records(self) -> list[dict]:
        return list(self._records.values())

    def append(self, record: dict) -> None:
        """Write one record and flush it to disk before returning. A write that fails part-way (ENOSPC) is cut
        back to the file's size before it, and the ``OSError`` names the file."""
        k = _hashable(record[self.key])
        if k in self._records:
            raise ValueError(f"{self.path}: record {record[self.key]!r} is already stored")
        if self._unusable:
            raise OSError(errno.EIO, f"{self.path}: no further appends from this store: {self._unusable}")
        lock_dir(self.path.parent)
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666 & ~_UMASK)
        try:
            end = os.lseek(fd, 0, os.SEEK_END)
            if end and os.pread(fd, 1, end - 1) != b"\n":  # a last record without its newline: no gluing on
                line = b"\n" + line
            try:
                view = memoryview(line)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except OSError as e:
                self._roll_back(fd, end, record, e)
        finally:
            os.close(fd)
        self._records[k] = record

    def _roll_back(self, fd: int, end: int, record: dict, e: OSError) -> None:
        """Undo a failed append (cut the file back to ``end`` bytes) and raise the error naming the file."""
        what = f"{self.path}: appending record {record[self.key]!r} failed ({e.strerror or e})"
        try:
            os.ftruncate(fd, end)
            os.fsync(fd)
        except OSError as e2:
            self._unusable = f"{what}, and cutting the partial line off failed too ({e2.strerror or e2})"
            raise OSError(e.errno, f"{self._unusable}; the file may end in a partial line, which the next open drops "
                          "as torn", str(self.path)) from e
        raise OSError(e.errno, f"{what}; rolled back to its last complete record ({end} bytes), nothing is lost: "
                      "free space and rerun") from e

    def extend(self, records: Iterable[dict]) -> None:
        for r in records:
            self.append(r)


def _parse_records(path: Path, key: str, repair: bool) -> tuple[dict[Any, dict], bool]:
    """Records of a store file by key. A torn last line (no newline, not JSON) is dropped (``repair``: cut from
    the file); a duplicate key or any other bad line raises an error naming the file and line."""
    raw = path.read_bytes()
    lines = raw.split(b"\n")  # the last item is what follows the last newline: b"" unless the last line is torn
    records: dict[Any, dict] = {}
    first_line: dict[Any, int] = {}
    good_bytes = 0
    torn = False
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            good_bytes += len(line) + 1
            continue
        try:
            rec = _json_line(line)
        except ValueError as e:
            why = e.msg if isinstance(e, json.JSONDecodeError) else f"not UTF-8: {e.reason} at byte {e.start}"
            if lineno == len(lines):  # no newline after it: a write cut by a crash; keep everything before it
                torn = True
                if repair:
                    print(f"[lwlib] {path}:{lineno}: dropping torn last line ({why})", file=sys.stderr)
                    with open(path, "r+b") as f:
                        f.truncate(good_bytes)
                else:
                    print(f"[lwlib] {path}:{lineno}: ignoring torn last line ({why})", file=sys.stderr)
                break
            raise ValueError(f"{path}:{lineno}: not valid JSON ({why}); the line is complete (it ends with a "
                             "newline), so it is not a torn write: fix or remove that line") from e
        if not isinstance(rec, dict) or key not in rec:
            raise ValueError(f"{path}:{lineno}: record has no field {key!r}")
        k = _hashable(rec[key])
        if k in records:
            raise ValueError(
                f"{path}:{lineno}: duplicate key {rec[key]!r} (first at line {first_line[k]}): two processes wrote "
                f"this file at once; keep one line per key (or delete the file) and rerun")
        records[k] = rec
        first_line[k] = lineno
        good_bytes += len(line) + 1
    return records, torn


def read_records(path: str | Path, key: str = "id") -> list[dict]:
    """The records of a :class:`JsonlStore` file, for readers: a duplicate key or a bad line is an error
    naming the file and line; a torn last line (a writer mid-append) is ignored, not cut."""
    return list(_parse_records(Path(path), key, repair=False)[0].values())


# ------------------------------------------------------------------------------------------ fingerprints


def fingerprint_path(store_path: str | Path) -> Path:
    """``<file>.fingerprint.json`` beside a store file."""
    p = Path(store_path)
    return p.with_name(p.name + ".fingerprint.json")


def read_fingerprint(store_path: str | Path) -> dict | None:
    """The fingerprint a store file was written under (None if it has none)."""
    p = fingerprint_path(store_path)
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))["fingerprint"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{p}: not a fingerprint file ({e}); delete it to adopt the records") from e


def fingerprint_id(fingerprint: dict) -> str:
    """A short stable hash of a fingerprint (its canonical JSON)."""
    blob = json.dumps(_canonical(fingerprint), sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:12]


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def data_fingerprint(path: str | Path) -> str:
    """``<file name>@<sha256 prefix>``: identifies a data file by content (not by where it lies)."""
    return f"{Path(path).name}@{sha256_file(path)[:16]}"


def model_fingerprint(model: str | os.PathLike, run_dir: str | Path | None = None) -> str:
    """A model's identity for fingerprints: a name or hub id as it is; a local folder as its path (relative
    to ``run_dir`` when inside it, so a moved run root keeps it) plus ``@`` a hash of its config and of its
    weight files (name, size, first and last MiB), so a retrained checkpoint in the same folder differs.

    A checkpoint that :func:`lwlib.sft.rebuild_run` trained again for a later sitting (``rebuild.json`` beside it,
    its loss curve within tolerance of the recorded one) is named by the run it rebuilds instead: ``@rebuilt-`` a
    hash of its config and of the first training's log (``train_log.recorded.json``). GPU training is not bitwise
    repeatable, so each sitting's rebuild has other weights; to the stores they are one model, and what one
    sitting's rebuild made (DPO samples, predictions, NLLs) resumes with the next one's."""
    p = Path(model)
    if not p.is_dir():
        return str(model)
    h = hashlib.sha256()
    if (p / "config.json").exists():
        h.update((p / "config.json").read_bytes())
    rebuild, recorded = p.parent / "rebuild.json", p.parent / "train_log.recorded.json"
    if rebuild.exists() and recorded.exists():
        try:
            same_run = json.loads(rebuild.read_text()).get("within_tol") is True
        except ValueError:
            same_run = False
        if same_run:
            h.update(recorded.read_bytes())
            return f"{_shown(p, run_dir)}@rebuilt-{h.hexdigest()[:16]}"
    for w in sorted(x for x in p.iterdir() if x.suffix in (".safetensors", ".bin", ".gguf", ".pt")):
        size = w.stat().st_size
        h.update(f"{w.name}:{size}".encode())
        with open(w, "rb") as f:
            h.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(size - (1 << 20))
                h.update(f.read())
    return f"{_shown(p, run_dir)}@{h.hexdigest()[:16]}"


def _shown(folder: Path, run_dir: str | Path | None) -> str:
    """``folder`` relative to ``run_dir`` when inside it, else its absolute path."""
    shown = folder.resolve()
    if run_dir is not None:
        try:
            shown = shown.relative_to(Path(run_dir).resolve())
        except ValueError:
            pass
    return str(shown)


def _canonical(obj: Any) -> Any:
    return json.loads(json.dumps(obj, ensure_ascii=False, sort_keys=True, default=str))


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _describe(changed: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k}: {json.dumps(a, ensure_ascii=False)} -> {json.dumps(b, ensure_ascii=False)}"
                     for k, (a, b) in sorted(changed.items()))


def _write_fingerprint(store_path: Path, fingerprint: dict) -> None:
    atomic_write_json(fingerprint_path(store_path), {
        "fingerprint": fingerprint, "id": fingerprint_id(fingerprint),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "note": f"settings that decide the records of {store_path.name}; lwlib refuses to mix other settings into it"})


def _move_aside(path: Path, name: str) -> Path:
    """Move store file ``path`` and its fingerprint to ``name`` beside it (``name-2``, ``name-3`` ... when taken):
    hard links, which fail rather than replace, so an earlier set-aside file is never overwritten."""
    fp = fingerprint_path(path)
    for n in range(1, 10_000):
        aside = path.with_name(name if n == 1 else f"{name}-{n}")
        if aside.exists() or fingerprint_path(aside).exists():
            continue
        if not _link(path, aside):
            continue
        if fp.exists():
            _link(fp, fingerprint_path(aside))
        path.unlink()  # the records first: a crash between the two leaves no records under the old fingerprint
        fp.unlink(missing_ok=True)
        return aside
    raise FileExistsError(f"{path}: no free name to move it aside to ({name}-N taken)")


def _link(src: Path, dst: Path) -> bool:
    """A second name ``dst`` for ``src``; False if ``dst`` exists. A copy where hard links are not supported
    (this process holds the folder's lock, so nothing else creates ``dst`` meanwhile)."""
    try:
        os.link(src, dst)
    except FileExistsError:
        return False
    except OSError:
        if dst.exists():
            return False
        shutil.copy2(src, dst)
    return True


def _warn(msg: str) -> None:
    warnings.warn(msg, stacklevel=3)
    print(f"[lwlib] {msg}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------ locks

_HELD: dict[str, int] = {}  # folder (real path) -> fd of its .lock, held until the process ends


def lock_dir(folder: str | Path) -> Path:
    """Take the exclusive lock of ``folder`` (``folder/.lock``, ``fcntl.flock``) for the rest of this process;
    a second call in the same process is a no-op. Another live process holding it raises
    :class:`RunLockedError` naming its PID (read from the lock file; where that process is gone, the processes
    that inherited the lock from it and still hold it: :func:`lock_holders`); the kernel drops the lock of a
    process that dies with nothing left holding it, so a killed run never leaves a stale lock. Returns the
    lock file.

    Usage: ``lock_dir(prof.stage_dir("probe") / "base")``
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ".lock"
    real = os.path.realpath(folder)
    if real in _HELD:
        return path
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            os.close(fd)
            raise
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
        os.close(fd)
        words = holder.split()
        pid = int(words[0]) if words and words[0].isdigit() else None
        if (pid is None or not pid_alive(pid)) and (len(words) < 2 or words[1] == platform.node()):
            # the process that took it is gone (kill -9): what holds it now is a child it left, which inherited
            # the lock's file descriptor; name that one, the process to stop
            alive = [h for h in lock_holders(path) if h != os.getpid()]
            if alive:
                raise RunLockedError(
                    f"{folder} is being written by {_describe_pids(alive)}, left running by PID "
                    f"{pid if pid is not None else '?'} (gone; the lock file's {holder!r}), which still holds the lock; "
                    f"two writers would store every record twice. Wait for it to finish or stop it "
                    f"(kill {' '.join(map(str, alive))}), then run again.", alive[0]) from None
        raise RunLockedError(
            f"{folder} is being written by another process (PID {pid if pid is not None else '?'}"
            f"{': ' + holder if holder else ''}); two writers would store every record twice. Wait for it to "
            f"finish or stop it (kill {pid if pid is not None else '<pid>'}), then run again.", pid) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {platform.node()} {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} "
                  f"{' '.join(sys.argv)[:120]}\n".encode(), 0)
    _HELD[real] = fd
    return path


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][:1] != "Z"
    except (OSError, IndexError):
        return True


def lock_holders(path: str | Path) -> list[int]:
    """PIDs of the live processes that have ``path`` open (Linux: their ``/proc/<pid>/fd``; [] where there is no
    /proc or nothing can be read), in order. A lock taken with ``flock`` is held by every process that inherited
    its file descriptor.

    Usage: ``lock_holders(run_dir / ".lock")``
    """
    target = os.path.realpath(path)
    out = []
    for d in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) == target for fd in d.iterdir()):
                out.append(int(d.parent.name))
        except OSError:  # gone meanwhile, or another user's
            continue
    return sorted(p for p in out if pid_alive(p))


def _describe_pids(pids: list[int]) -> str:
    """``PID 12 (python -m lwlib.nbrun ...), PID 34 (...)``: each with its command line where readable."""
    def cmd(p: int) -> str:
        try:
            raw = Path(f"/proc/{p}/cmdline").read_bytes().decode("utf-8", "replace")
            return " ".join(raw.replace("\0", " ").split())[:100]
        except OSError:
            return ""
    return ", ".join(f"PID {p}" + (f" ({c})" if (c := cmd(p)) else "") for p in pids)


def _hashable(key: Any) -> Any:
    return tuple(key) if isinstance(key, list) else key


def _json_line(line: bytes) -> Any:
    """One JSON line (UTF-8 bytes): ``json.JSONDecodeError`` or ``UnicodeDecodeError`` (both ValueErrors)."""
    return json.loads(line.decode("utf-8"))


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, Any]]:
    """``(line number, record)`` for each non-blank line of a JSONL file, so callers that validate
    records can name the line; a line that is not JSON, or not UTF-8, raises an error naming the file and line."""
    path = Path(path)
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = _json_line(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from e
            except UnicodeDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not UTF-8 ({e.reason} at byte {e.start} of the line)") from e
            yield lineno, rec


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a JSONL file; a bad line raises an error naming the file and line."""
    return [rec for _, rec in iter_jsonl(path)]


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file beside it (flushed and fsynced) and an atomic rename:
    a reader sees the old file or the new one, never a torn one. Every file lwlib writes whole goes through this
    (or :func:`atomic_write_text`, :func:`atomic_write_json`, :func:`atomic_write_jsonl`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give them the usual permissions
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError) and not e.filename:  # a full disk says ENOSPC, not where: name the file
            raise OSError(e.errno, f"writing {path} failed ({e.strerror or e}); the file is as it was before") from e
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and an atomic rename."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=2, default=str) + "\n")


def atomic_write_jsonl(path: str | Path, records: Iterable[Any]) -> Path:
    """Write ``records`` as a whole JSONL file (one JSON value a line), atomically; for files rewritten whole
    (a stage's final output), not for resumable stores (:class:`JsonlStore` appends)."""
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def training_finished(out_dir: str | Path) -> bool:
    """Whether a training stage finished: its model folder has ``config.json`` and ``train_log.json`` lies
    beside the folder (the layout of :func:`lwlib.sft.train_sft` and :func:`lwlib.dpo.train_dpo`)."""
    out_dir = Path(out_dir)
    return (out_dir / "config.json").exists() and (out_dir.parent / "train_log.json").exists()


def read_log_history(folder: str | Path, trainer: str) -> list[dict]:
    """``log_history`` of ``train_log.json`` in ``folder`` or, for a model folder, beside it; a missing log
    names ``trainer``, the function that writes it."""
    folder = Path(folder)
    path = folder / "train_log.json" if (folder / "train_log.json").exists() else folder.parent / "train_log.json"
    if not path.exists():
        raise FileNotFoundError(f"no train_log.json in {folder} or its parent: train with {trainer}")
    return json.loads(path.read_text())["log_history"]

def git_sha(repo: Path = REPO_ROOT) -> str | None:
    """The checkout's commit, with ``-dirty`` when it has uncommitted changes; None outside git."""
    try:
        sha = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


_PACKAGES = ("torch", "transformers", "trl", "accelerate", "deepspeed", "openai", "gguf", "numpy", "papermill")


def library_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    try:
        import torch

        out["cuda"] = torch.version.cuda
        out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return out


def compile_caches() -> dict[str, str]:
    """Where compiled kernels persist between runs, set for this process when unset: torch.compile's
    (``$TORCHINDUCTOR_CACHE_DIR``, default ``<lwlib cache>/inductor``) and Triton's (``$TRITON_CACHE_DIR``, default
    ``<lwlib cache>/triton``: the slots engine's attention kernel, Liger's kernels). Every manifest records both.

    Usage: ``compile_caches()["triton"]``
    """
    from .models import cache_dir

    return {"inductor": os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor")),
            "triton": os.environ.setdefault("TRITON_CACHE_DIR", str(cache_dir() / "triton"))}


def write_manifest(folder: str | Path, config: Any, name: str = "manifest.json") -> Path:
    """Record the resolved config, library versions, git SHA, host, time and the compile caches
    (:func:`compile_caches`) in ``folder/name``."""
    from dataclasses import asdict, is_dataclass

    cfg = asdict(config) if is_dataclass(config) else config
    return atomic_write_json(
        Path(folder) / name,
        {
            "config": cfg,
            "versions": library_versions(),
            "git_sha": git_sha(),
            "compile_caches": compile_caches(),
            "host": platform.node(),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "argv": sys.argv,
            "command": run_command(),
        },
    )


def run_command() -> str:
    """What is running, for a reader of the manifest: ``$LWLIB_COMMAND`` (``run_all.sh`` sets it to its command line
    and the notebook), else the notebook JupyterLab runs (``$JPY_SESSION_NAME``), else the command line; a Jupyter
    kernel's own command line (``ipykernel_launcher -f <kernel file>``) says nothing and is not given."""
    if os.environ.get("LWLIB_COMMAND"):
        return os.environ["LWLIB_COMMAND"]
    argv0 = Path(sys.argv[0]).name if sys.argv else ""
    if os.environ.get("JPY_SESSION_NAME"):
        return f"Jupyter: {os.environ['JPY_SESSION_NAME']}"
    if argv0.startswith(("ipykernel_launcher", "ipykernel")):
        return "a Jupyter kernel (notebook not known)"
    return " ".join(sys.argv)


class Sitting:
    """A time limit for starting long units of work (training runs), from ``$LWLIB_SITTING_END`` (Unix time): on a
    machine lent for a fixed time, a run that cannot end before the limit is not started, so nothing is cut halfway
    and the next sitting resumes at a run boundary. A unit starts while the time left covers the longest unit timed
    so far (before any: ``$LWLIB_SITTING_RUN_S`` seconds, default 0). Without ``$LWLIB_SITTING_END`` everything starts.

    Usage::

        sitting = Sitting.from_env()
        for run in runs:
            if not sitting.room():
                break
            with sitting.timed():
                train(run)
    """

    def __init__(self, end: float | None = None, estimate_s: float = 0.0) -> None:
        self.end = end
        self.longest = float(estimate_s)

    @classmethod
    def from_env(cls) -> Sitting:
        def number(name: str) -> float | None:
            raw = os.environ.get(name, "").strip()
            try:
                return float(raw) if raw else None
            except ValueError:
                raise ValueError(f"${name}={raw!r} is not a number of seconds") from None

        return cls(number("LWLIB_SITTING_END"), number("LWLIB_SITTING_RUN_S") or 0.0)

    def left(self) -> float | None:
        """Seconds until the limit (None: no limit)."""
        return None if self.end is None else self.end - time.time()

    def room(self) -> bool:
        """Whether a unit as long as the longest so far ends before the limit."""
        left = self.left()
        return left is None or left >= self.longest

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        """Time one unit (the longest sets what :meth:`room` asks for)."""
        t0 = time.time()
        yield
        self.longest = max(self.longest, time.time() - t0)

    @staticmethod
    def record_waiting(run_dir: str | Path, notebook: str, waiting: list[str]) -> Path:
        """Write which units of ``notebook`` (the file name, e.g. ``03_sft.ipynb``) wait for a later sitting to
        ``<run_dir>/sitting.json`` (``{"waiting": {notebook: [...]}}``; an empty list removes the entry).
        ``run_all.sh --resume`` does not skip a notebook that left units waiting: its executed copy ended without
        error, but its work is not done. Returns the file.

        Usage: ``Sitting.record_waiting(prof.run_dir, "03_sft.ipynb", waiting)``"""
        path = Path(run_dir) / "sitting.json"
        state = waiting_units(run_dir)
        state.pop(notebook, None)
        if waiting:
            state[notebook] = list(waiting)
        atomic_write_json(path, {"waiting": state})
        return path


def waiting_units(run_dir: str | Path, notebook: str | None = None) -> Any:
    """What :meth:`Sitting.record_waiting` wrote: ``{notebook: [units]}``, or for one ``notebook`` its list (empty
    where nothing waits). A missing file: nothing waits; an unreadable one is an error naming it."""
    path = Path(run_dir) / "sitting.json"
    if not path.exists():
        state: dict[str, list[str]] = {}
    else:
        try:
            state = dict(json.loads(path.read_text(encoding="utf-8"))["waiting"])
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a sitting record ({e}); delete it to start over") from None
    return state if notebook is None else list(state.get(notebook, []))
