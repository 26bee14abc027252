"""Profiles: one YAML file per profile (``smoke``, ``gpu``, ``paper``) choosing model, sizes and settings.

A profile file has a few top-level fields (below) and one section per stage (``probe``, ``agentwrite``,
``sft``, ``dpo``, ``nll``, ``bench``, ...). Each stage module owns a dataclass config for its section,
registered in :data:`SECTIONS`, and reads it with :meth:`Profile.section`. Values are checked against the
dataclass's type hints and coerced where that is lossless (see :func:`from_dict`); unknown sections, unknown
fields and wrongly typed values are errors naming the file (or the override) and the dotted field. The same
code path runs in every profile; only these values change.

Usage::

    profile = load_profile("smoke", overrides={"probe.max_new_tokens": 32})
    cfg = profile.section("probe", ProbeConfig)     # or profile.section("probe"): the registered class
    out = profile.stage_dir("probe")                # runs/smoke/probe/
    errors = validate_profile(profile)              # every registered section built: [] when all is well

    python -m lwlib.config check gpu --set sft.max_steps=10     # the same check from a shell (run_all.sh)

Top-level fields:
    name: the profile's name (letters, digits, ``._-``); its run folder is ``<run_root>/<name>``.
        Default: the file's stem. A copied profile that keeps
        ``name: smoke`` shares ``runs/smoke`` (its stores then refuse records made with other settings:
        lwlib.runs.StaleRunError).
    description: one line shown in notebooks.
    model: the base model: a built-in name (``smollm2-135m-instruct``), a Hugging Face id or a folder.
    seed: global seed for sampling and data construction.
    device: ``auto`` (CUDA if present, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.
    dtype: ``auto`` (bf16 on CUDA, fp32 on CPU), ``bfloat16``, ``float16`` or ``float32``.
    decodings: the named decodings every length measurement runs under (:mod:`lwlib.decodings`; default: the
        paper's alone).
    too_small_for_verdicts: ``true`` where the profile's sizes are far too small for the claims' verdicts to mean
        anything (``smoke``: a few CPU steps on tiny data show that the pipeline runs end to end); notebook 06 and
        the HTML report then show a banner above the claims table. Default ``false``.

Where things go: the run folder is ``<run root>/<name>`` (run root: the notebooks' ``run_root``, else
``$LWLIB_RUNS``, else ``runs/`` of the checkout lwlib was imported from); figures go to ``<figures root>/<name>``
when a figures root is given (the notebooks' ``figures_root``, else ``$LWLIB_FIGURES``), else beside the run: to
the checkout's ``figures/<name>`` for a run under its ``runs/``, to ``<run folder>/figures`` for a run elsewhere
(:func:`figures_dir_for`), so that ``LWLIB_RUNS`` moves the figures with the runs.

A new section is one line in :data:`SECTIONS` (``"corpus": "lwlib.corpus:CorpusConfig"``) or a call to
:func:`register_section`; its module is imported only when the section is built, and a registered module
that does not import is an error naming the section.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import importlib
import json
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from .runs import REPO_ROOT

PROFILE_DIR = Path(__file__).resolve().parent / "profiles"
T = TypeVar("T")

# Section name -> its dataclass, as "module:Class" (imported when first built) or the class itself.
SECTIONS: dict[str, str | type] = {
    "probe": "lwlib.probe:ProbeConfig",
    "agentwrite": "lwlib.agentwrite:AgentWriteConfig",
    "sft": "lwlib.sft:SFTConfig",
    "dpo": "lwlib.dpo:DPOStageConfig",
    "nll": "lwlib.nll:NLLConfig",
    "bench": "lwlib.bench:BenchConfig",
    "corpus": "lwlib.corpus:CorpusConfig",
}


def register_section(name: str, target: str | type) -> None:
    """Register (or replace) profile section ``name``: ``register_section("corpus", "lwlib.corpus:CorpusConfig")``."""
    if not isinstance(target, type) and ":" not in str(target):
        raise ValueError(f"register_section({name!r}): target must be a dataclass or 'module:Class', got {target!r}")
    SECTIONS[name] = target


def default_run_root() -> Path:
    """``$LWLIB_RUNS`` if set, else ``runs/`` in the repository."""
    return Path(os.environ.get("LWLIB_RUNS", REPO_ROOT / "runs"))


def figures_dir_for(run_dir: str | Path, root: str | Path | None = None) -> Path:
    """Where the figures of the run folder ``run_dir`` go (not created): ``<root>/<run name>`` for a figures root
    given here or in ``$LWLIB_FIGURES``; else ``figures/<run name>`` of the checkout for a run under its ``runs/``,
    and ``<run_dir>/figures`` for a run elsewhere (``$LWLIB_RUNS``): figures follow the run folder.

    Usage: ``figures_dir_for("runs/smoke")`` -> ``<checkout>/figures/smoke``"""
    run_dir = Path(run_dir)
    root = root or os.environ.get("LWLIB_FIGURES")
    if root:
        return Path(root) / run_dir.name
    if run_dir.absolute().parent.resolve() == (REPO_ROOT / "runs").resolve():
        return REPO_ROOT / "figures" / run_dir.name
    return run_dir / "figures"


# ------------------------------------------------------------------------------------------- errors


class ConfigError(ValueError):
    """A bad profile value: ``str(e)`` is ``"<source>: <dotted path>: <reason>"``.

    ``source`` is the file (or the override, e.g. ``--set sft.max_steps=ten``), ``path`` the dotted field or
    section the reason is about, and ``fields`` the full dotted fields involved (for an unknown-field error:
    each unknown field), from which :class:`Profile` tells a file's mistake from an override's.
    """

    def __init__(self, source: str, path: str, reason: str, fields: typing.Iterable[str] = ()):
        self.source, self.path, self.reason = str(source or ""), path, reason
        self.fields = tuple(fields) or ((path,) if path else ())
        super().__init__(": ".join(x for x in (self.source, self.path, self.reason) if x))

    def with_source(self, source: str) -> ConfigError:
        return ConfigError(source, self.path, self.reason, self.fields)


# ------------------------------------------------------------------------------------- typed values

_NUMBER = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?")
_UNION_TYPES = (Union, types.UnionType)


def _type_name(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin in _UNION_TYPES:
        return " or ".join(_type_name(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (list, tuple, set):
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    if is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _number(value: Any) -> float | int | None:
    """``value`` as a number when it is one or a numeric string (YAML reads ``1e-4`` as a string)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        s = value.strip()
        return int(s) if re.fullmatch(r"[+-]?\d+", s) else float(s)
    return None


def _exact(value: Any, tp: Any) -> bool:
    """Whether ``value`` already has type ``tp`` (no coercion needed): picks the member of a union."""
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    origin = typing.get_origin(tp)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in typing.get_args(tp))
    if tp is float:
        return isinstance(value, float)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp in (bool, str):
        return isinstance(value, tp)
    if origin in (list, tuple, set):
        return isinstance(value, (list, tuple))
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    if is_dataclass(tp):
        return isinstance(value, (dict, tp))
    return False


def coerce(value: Any, tp: Any, path: str = "", source: str = "") -> Any:
    """Check ``value`` against type hint ``tp`` and convert it where that loses nothing.

    Rules: ``float`` takes ints and numeric strings (``"1e-4"``, which YAML reads as a string);
    ``int`` takes ints, numeric strings and floats with an integral value (``5.0``, ``"1e3"``), never
    ``5.5`` or ``true``; ``bool`` takes only ``true``/``false``; ``str`` takes only strings (``model: 7``
    is an error); lists, mappings and nested dataclasses are checked element by element; a union
    (``bool | str``, ``int | None``) takes the first member the value already is, else the first it
    converts to; ``Literal[...]`` takes only its values; other hints are not checked.
    Raises :class:`ConfigError` (``<source>: <path>: expected float, got 'abc'``).
    """

    def bad(reason: str | None = None) -> ConfigError:
        return ConfigError(source, path, reason or f"expected {_type_name(tp)}, got {value!r}")

    if tp is Any or tp is None or isinstance(tp, (str, TypeVar)):
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in _UNION_TYPES:
        for a in args:
            if _exact(value, a):
                return coerce(value, a, path, source)
        for a in args:
            try:
                return coerce(value, a, path, source)
            except ConfigError:
                continue
        raise bad()
    if origin is Literal:
        if _exact(value, tp):
            return value
        raise bad()
    if tp is type(None):
        if value is None:
            return None
        raise bad()
    if is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, dict):
            return from_dict(tp, value, where=path, source=source)
        raise bad()
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        n = _number(value)
        if isinstance(n, int):
            return n
        if isinstance(n, float) and n.is_integer():
            return int(n)
        raise bad()
    if tp is float:
        n = _number(value)
        if n is None:
            raise bad()
        return float(n)
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad()
    if tp is Path:
        if isinstance(value, (str, os.PathLike)):
            return Path(value)
        raise bad()
    if origin in (list, tuple, set) or tp in (list, tuple, set):
        if not isinstance(value, (list, tuple)):
            raise bad()
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise bad(f"expected {len(args)} values, got {len(value)}: {value!r}")
            return tuple(coerce(v, a, f"{path}[{i}]", source) for i, (v, a) in enumerate(zip(args, value)))
        elem = args[0] if args else Any
        out = [coerce(v, elem, f"{path}[{i}]", source) for i, v in enumerate(value)]
        return (tuple if (origin or tp) is tuple else set if (origin or tp) is set else list)(out)
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise bad()
        kt, vt = args if len(args) == 2 else (Any, Any)
        return {coerce(k, kt, f"{path}.{k}", source): coerce(v, vt, f"{path}.{k}", source) for k, v in value.items()}
    return value  # a hint this checker does not know: passed through unchecked


def from_dict(cls: type[T], raw: dict[str, Any], where: str = "", source: str = "") -> T:
    """Construct dataclass ``cls`` from ``raw``, every value checked and coerced by :func:`coerce`.

    ``where`` is the dotted path of ``raw`` (``"sft"``), ``source`` the file or override it came from;
    errors read ``"<source>: <where>.<field>: <reason>"``: unknown fields (with the close known names),
    wrongly typed values, and the ``ValueError`` of the dataclass's ``__post_init__``. Nested dataclass
    fields are built recursively from nested mappings.
    """
    if not isinstance(raw, dict):
        raise ConfigError(source, where, f"expected a mapping ({cls.__name__}), got {raw!r}")
    known = {f.name: f for f in fields(cls) if f.init}
    unknown = sorted(set(raw) - set(known), key=str)
    if unknown:
        close = {u: difflib.get_close_matches(str(u), list(known), n=1) for u in unknown}
        hint = ", ".join(f"{c[0]!r} for {u!r}" for u, c in close.items() if c)
        raise ConfigError(source, where, f"unknown field(s) {unknown}" + (f" (did you mean {hint}?)" if hint else "")
                          + f"; {cls.__name__} has {sorted(known)}", [_join(where, str(u)) for u in unknown])
    try:
        hints = typing.get_type_hints(cls)
    except Exception as e:  # an annotation that does not resolve: a bug in the config class, not the profile
        raise ConfigError(source, where, f"{cls.__module__}.{cls.__name__}: cannot resolve its type hints "
                          f"({type(e).__name__}: {e})") from e
    kwargs = {k: coerce(v, hints.get(k, Any), _join(where, k), source) for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(source, where, str(e)) from e


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


# --------------------------------------------------------------------------------------- top level


@dataclass
class ProfileHeader:
    """The top-level fields of a profile (documented in this module's docstring)."""

    name: str = ""
    description: str = ""
    model: str = ""
    seed: int = 0
    device: str = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    decodings: Any = None
    too_small_for_verdicts: bool = False

    def __post_init__(self) -> None:
        if self.decodings is not None:
            from .decodings import parse_decodings

            parse_decodings(self.decodings)  # names, fields and values checked (lwlib.decodings)
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise ValueError(f"name must be letters, digits and ._- (it names the run folder), got {self.name!r}")
        if not self.model:
            raise ValueError("missing field 'model'")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", self.device):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")


TOP_LEVEL = {f.name for f in fields(ProfileHeader)}


def section_class(name: str) -> type:
    """The dataclass registered for section ``name`` (its module imported now)."""
    if name not in SECTIONS:
        raise ConfigError("", name, f"unknown section; known sections: {sorted(SECTIONS)}")
    target = SECTIONS[name]
    if isinstance(target, type):
        return target
    mod, _, attr = str(target).partition(":")
    try:
        cls = getattr(importlib.import_module(mod), attr)
    except Exception as e:
        raise ConfigError("", name, f"section registered as {target!r} in lwlib.config.SECTIONS, "
                          f"which does not import: {type(e).__name__}: {e}") from e
    if not is_dataclass(cls):
        raise ConfigError("", name, f"section registered as {target!r}, which is not a dataclass")
    return cls


# ----------------------------------------------------------------------------------------- profiles


@dataclass
class Profile:
    """A loaded profile. ``data`` is the resolved YAML (overrides applied); ``overrides`` the dotted
    overrides applied to it, ``override_labels`` how errors name each (default ``override k=v``)."""

    name: str
    source: Path
    data: dict[str, Any]
    run_root: Path = field(default_factory=default_run_root)
    overrides: dict[str, Any] = field(default_factory=dict)
    override_labels: dict[str, str] = field(default_factory=dict)

    @property
    def header(self) -> ProfileHeader:
        return self._build(ProfileHeader, {k: v for k, v in self.data.items() if k in TOP_LEVEL}, "")

    @property
    def model(self) -> str:
        return self.data["model"]

    @property
    def seed(self) -> int:
        return self.header.seed

    @property
    def device(self) -> str:
        return self.data.get("device", "auto")

    @property
    def dtype(self) -> str:
        return self.data.get("dtype", "auto")

    @property
    def run_dir(self) -> Path:
        return self.run_root / self.name

    def stage_dir(self, stage: str) -> Path:
        """``<run_root>/<profile>/<stage>``, created."""
        p = self.run_dir / stage
        p.mkdir(parents=True, exist_ok=True)
        return p

    @property
    def too_small_for_verdicts(self) -> bool:
        """Whether the claims' verdicts of this profile mean nothing (the header field; ``smoke``)."""
        return self.header.too_small_for_verdicts

    def figures_dir(self, root: str | Path | None = None) -> Path:
        """The run's figures folder, created: ``<root>/<profile>`` for a figures root given or in
        ``$LWLIB_FIGURES``, else beside the run folder (:func:`figures_dir_for`)."""
        p = figures_dir_for(self.run_dir, root)
        p.mkdir(parents=True, exist_ok=True)
        return p

    def section(self, key: str, cls: type[T] | None = None) -> T:
        """Build the dataclass ``cls`` (default: the one registered for ``key``) from the profile's ``key``
        section (missing section: defaults); a bad value raises :class:`ConfigError` naming the file or
        the override it came from, and the dotted field."""
        if cls is None:
            try:
                cls = section_class(key)
            except ConfigError as e:
                raise e.with_source(str(self.source)) from None
        raw = self.data.get(key)
        return self._build(cls, {} if raw is None else raw, key)

    def _build(self, cls: type[T], raw: Any, where: str) -> T:
        try:
            return from_dict(cls, raw, where=where, source=str(self.source))
        except ConfigError as e:
            raise self.blame(e) from None

    def _label(self, key: str) -> str:
        return self.override_labels.get(key) or f"override {key}={json.dumps(self.overrides[key], default=str)}"

    def blame(self, e: ConfigError) -> ConfigError:
        """``e`` re-attributed to the override(s) it is about: an override that set the bad field (or a
        mapping above it) is named instead of the file; an error about a whole section that an override
        changed names the file and the override."""
        def under(f: str, k: str) -> bool:
            return f == k or f.startswith(k + ".") or f.startswith(k + "[")

        hit = [k for k in self.overrides if any(under(f, k) for f in e.fields)]
        if hit:
            return e.with_source("; ".join(self._label(k) for k in hit))
        touched = [k for k in self.overrides if any(f and k.startswith(f + ".") for f in e.fields)]
        if touched:
            return e.with_source(f"{self.source} with {', '.join(self._label(k) for k in touched)}")
        return e

    def resolved(self) -> dict[str, Any]:
        """The full resolved profile, for manifests (``source``: the absolute path of the file)."""
        out = {"profile": self.name, "source": str(Path(self.source).absolute()), **copy.deepcopy(self.data)}
        if self.overrides:
            out["overrides"] = copy.deepcopy(self.overrides)
        return out


def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise ConfigError("", dotted, f"{k!r} is not a section", [dotted])
    d[keys[-1]] = value


def profile_source(name_or_path: str | Path, base_dir: str | Path | None = None) -> Path:
    """The absolute file of a profile: a built-in name (``smoke``) or a path (``x.yaml``, ``dir/x``, an
    existing file), a relative path taken from ``base_dir`` (default: the current directory)."""
    s = str(name_or_path)
    p = Path(s).expanduser()
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    full = p if p.is_absolute() else base / p
    if p.suffix in (".yaml", ".yml") or "/" in s or full.exists():
        if not full.is_file():
            raise FileNotFoundError(f"no profile file {os.path.abspath(full)}")
        return Path(os.path.abspath(full))
    source = PROFILE_DIR / f"{s}.yaml"
    if not source.exists():
        avail = sorted(x.stem for x in PROFILE_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no profile {s!r}; built-in profiles: {avail} (or give a path to a YAML file)")
    return source


def load_profile(
    name_or_path: str | Path,
    overrides: dict[str, Any] | None = None,
    run_root: str | Path | None = None,
    *,
    base_dir: str | Path | None = None,
    override_labels: dict[str, str] | None = None,
) -> Profile:
    """Load a built-in profile by name (``smoke``/``gpu``/``paper``) or a YAML file by path.

    ``overrides`` maps dotted keys to values (``{"probe.lengths": [1000]}``), applied after loading,
    so notebooks and tests can shrink a profile without a new file. A relative path is taken from
    ``base_dir`` (default: the current directory); ``override_labels`` names overrides in errors
    (``{"sft.max_steps": "--set sft.max_steps=ten"}``). The top-level fields and the section names are
    checked here; each section's fields when it is built (:meth:`Profile.section`, :func:`validate_profile`).
    """
    source = profile_source(name_or_path, base_dir)
    try:
        data = yaml.safe_load(source.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(str(source), "", f"not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(str(source), "", "a profile must be a mapping")
    overrides = dict(overrides or {})
    prof = Profile(name=str(data.get("name") or source.stem), source=source, data=data,
                   run_root=Path(run_root) if run_root else default_run_root(), overrides=overrides,
                   override_labels=dict(override_labels or {}))
    in_file = set(data)
    for dotted, value in overrides.items():
        try:
            _set_dotted(data, dotted, value)
        except ConfigError as e:
            raise prof.blame(e) from None
    data.setdefault("name", source.stem)
    for k, v in data.items():
        if k in TOP_LEVEL:
            continue
        # a section the file lacks comes from an override: blame names the override(s) under it
        fields_ = [k] if k in in_file else [d for d in overrides if d == k or d.startswith(f"{k}.")]
        if k not in SECTIONS:
            close = difflib.get_close_matches(str(k), list(SECTIONS) + sorted(TOP_LEVEL), n=1)
            raise prof.blame(ConfigError(
                str(source), str(k), "unknown section" + (f" (did you mean {close[0]!r}?)" if close else "")
                + f"; known sections: {sorted(SECTIONS)}; top-level fields: {sorted(TOP_LEVEL)}", fields_))
        if v is not None and not isinstance(v, dict):
            raise prof.blame(ConfigError(str(source), str(k), f"a section must be a mapping, got {v!r}", fields_))
    header = prof.header  # checks name, model, seed, device, dtype
    prof.name = header.name
    return prof


def validate_profile(prof: Profile) -> list[str]:
    """Build every registered section of ``prof`` (absent ones from their defaults); the errors, one line
    each (empty when the whole profile is valid). A section whose module does not import is an error."""
    errors = []
    try:
        prof.header
    except ConfigError as e:
        errors.append(str(e))
    for key in SECTIONS:
        try:
            prof.section(key)
        except ConfigError as e:
            errors.append(str(e))
    return errors


def parse_set(item: str) -> tuple[str, Any]:
    """``"sft.caps=[500, 1000]"`` -> ``("sft.caps", [500, 1000])`` (the value parsed as YAML)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {item}", "", "needs KEY=VALUE (e.g. --set sft.max_steps=10)")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item}", "", f"the value is not valid YAML: {e}") from e


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``["sft.max_steps=2", "sft.caps=[500, 1000]"]`` -> overrides (values parsed as YAML)."""
    return dict(parse_set(it) for it in items)


def set_labels(items: list[str]) -> dict[str, str]:
    """How errors name each ``--set`` override: ``{"sft.max_steps": "--set sft.max_steps=10"}``."""
    return {parse_set(it)[0]: f"--set {it}" for it in items}


def asdict(cfg: Any) -> dict[str, Any]:
    """``dataclasses.asdict`` that also accepts plain dicts (for manifests)."""
    return dataclasses.asdict(cfg) if is_dataclass(cfg) else dict(cfg)


# ----------------------------------------------------------------------------------------------- CLI


def gpu_warning(prof: Profile) -> str | None:
    """A warning when a profile meant for a GPU (any but ``smoke`` whose device is not ``cpu``) meets a
    machine where torch sees no CUDA device; None otherwise."""
    device = prof.header.device
    if prof.name == "smoke" or device == "cpu":
        return None
    try:
        import torch

        if torch.cuda.is_available():
            return None
    except ImportError:
        pass
    then = "its models will fail to load" if device.startswith("cuda") else \
        "everything runs on the CPU, which at this profile's sizes takes hours or days"
    return (f"warning: profile {prof.name} ({prof.source}) has device: {device}, but no CUDA GPU is visible: "
            f"{then}. For a CPU run use the smoke profile.")


def main(argv: list[str] | None = None) -> int:
    """``python -m lwlib.config check PROFILE [--set K=V ...]``: load and validate a whole profile."""
    ap = argparse.ArgumentParser(prog="python -m lwlib.config", description="Check a profile: load it with its "
                                 "overrides and build every section; errors name the file or the --set and the field.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    ck = sub.add_parser("check", help="validate a profile (exit 2 on an error)")
    ck.add_argument("profile", help="smoke | gpu | gpu_short | paper | path to a YAML profile")
    ck.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="override, e.g. sft.max_steps=10 (value parsed as YAML; repeatable)")
    ck.add_argument("--base-dir", default=None, help="directory a relative profile path is taken from (default: cwd)")
    ck.add_argument("--papermill-params", action="store_true",
                    help="on success print two lines: the profile's name, then the notebooks' parameters as one "
                         "line of YAML (profile: absolute path or built-in name; overrides)")
    args = ap.parse_args(argv)
    try:
        overrides = parse_sets(args.sets)
        prof = load_profile(args.profile, overrides, base_dir=args.base_dir, override_labels=set_labels(args.sets))
        errors = validate_profile(prof)
    except (ConfigError, FileNotFoundError) as e:
        errors = [str(e)]
    if errors:
        for e in errors:
            print(f"error: {e}", file=sys.stderr)
        return 2
    warn = gpu_warning(prof)
    if warn:
        print(warn, file=sys.stderr)
    if args.papermill_params:
        builtin = prof.source == PROFILE_DIR / f"{args.profile}.yaml"
        params = {"profile": args.profile if builtin else str(prof.source), "overrides": overrides}
        print(prof.name)  # one line each: flow-style YAML for papermill -y (JSON's 1e-05 would read as a string)
        print(yaml.safe_dump(params, default_flow_style=True, width=10**9, allow_unicode=True).strip())
    else:
        print(f"profile {prof.name} ({prof.source}): OK, sections {', '.join(sorted(SECTIONS))}"
              + (f"; overrides {overrides}" if overrides else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
