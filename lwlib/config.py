"""Profiles: one YAML file per profile (``smoke``, ``gpu``, ``paper``) choosing model, sizes and settings.

A profile file has a few top-level fields (below) and one section per stage (``probe``, ``agentwrite``,
``sft``, ``dpo``, ``nll``, ``bench``, ...). Each stage module owns a dataclass config for its section,
registered in :data:`SECTIONS`, and reads it with :meth:`Profile.section`. Values are checked against the
dataclass's type hints and coerced where that is lossless (see :func:`from_dict`, :mod:`lwlib.typed`); unknown
sections, unknown fields and wrongly typed values are errors naming the file (or the override) and the dotted
field. The same code path runs in every profile; only these values change.

Usage::

    profile = load_profile("smoke", overrides={"probe.max_new_tokens": 32})
    cfg = profile.section("probe", ProbeConfig)     # or profile.section("probe"): the registered class
    out = profile.stage_dir("probe")                # runs/smoke/probe/
    errors = validate_profile(profile)              # every registered section built: [] when all is well

    python -m lwlib.config check gpu --set sft.max_steps=10     # the same check from a shell (run_all.sh)

Top-level fields:
    include: another profile (a built-in name, or a path taken from this file's folder) loaded first; this file's
        values are merged over it: mappings key by key, a list, a scalar or ``null`` replaces the included value
        (:func:`merge_profiles`). ``name`` and ``description`` are never inherited. Included files may include
        others; a cycle is an error naming the files. Errors about a value name the file it came from
        (``paper.yaml (included by paper_rehearsal.yaml): ...``).
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
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from .runs import REPO_ROOT
from .typed import ConfigError, check_sizes, coerce, from_dict  # noqa: F401 - re-exported: lwlib.config API

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
    """A loaded profile. ``data`` is the resolved YAML (included profiles merged, overrides applied); ``overrides``
    the dotted overrides applied to it, ``override_labels`` how errors name each (default ``override k=v``);
    ``includes`` the files ``include`` brought in (nearest first), ``origins`` the file each dotted value of
    ``data`` came from (empty without includes: all from ``source``)."""

    name: str
    source: Path
    data: dict[str, Any]
    run_root: Path = field(default_factory=default_run_root)
    overrides: dict[str, Any] = field(default_factory=dict)
    override_labels: dict[str, str] = field(default_factory=dict)
    includes: list[Path] = field(default_factory=list)
    origins: dict[str, str] = field(default_factory=dict)

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

    def numerics(self) -> dict[str, str]:
        """The device type and dtype local models of this profile run at on this machine, ``auto`` resolved
        (``{"device": "cpu", "dtype": "float32"}``): part of the fingerprint of every store a local model fills,
        so that ``--set dtype=bfloat16`` is refused as a change instead of resuming float32 records."""
        from .models import pick_device, pick_dtype

        device = pick_device(self.device)
        return {"device": device.type, "dtype": str(pick_dtype(self.dtype, device)).removeprefix("torch.")}

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

    def origin(self, fields_: tuple[str, ...] | list[str]) -> str:
        """The file the dotted ``fields_`` of an error came from: ``source``, or for values an included profile
        set, ``<that file> (included by <source>)`` (several files: all of them named)."""
        if not self.origins:
            return str(self.source)
        keys = [re.sub(r"\[.*$", "", f) for f in fields_ if f]
        files = {self.origins[k] for k in keys if k in self.origins}  # the fields themselves, else what is under them
        files = files or {o for k in keys for leaf, o in self.origins.items() if leaf.startswith(k + ".")}
        files.discard(str(self.source))
        if not files:
            return str(self.source)
        return f"{', '.join(sorted(files))} (included by {self.source})"

    def blame(self, e: ConfigError) -> ConfigError:
        """``e`` re-attributed to the override(s) it is about: an override that set the bad field (or a
        mapping above it) is named instead of the file; an error about a whole section that an override
        changed names the file and the override; a value an included profile set names that file."""
        def under(f: str, k: str) -> bool:
            return f == k or f.startswith(k + ".") or f.startswith(k + "[")

        hit = [k for k in self.overrides if any(under(f, k) for f in e.fields)]
        if hit:
            return e.with_source("; ".join(self._label(k) for k in hit))
        file = self.origin(e.fields) if e.source == str(self.source) else e.source
        touched = [k for k in self.overrides if any(f and k.startswith(f + ".") for f in e.fields)]
        if touched:
            return e.with_source(f"{file} with {', '.join(self._label(k) for k in touched)}")
        return e.with_source(file)

    def resolved(self) -> dict[str, Any]:
        """The full resolved profile, for manifests (``source``: the absolute path of the file; ``includes``: the
        files it included, when it did; the values: included profiles merged, overrides applied)."""
        out = {"profile": self.name, "source": str(Path(self.source).absolute()), **copy.deepcopy(self.data)}
        if self.includes:
            out["includes"] = [str(Path(p).absolute()) for p in self.includes]
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


def _read_profile(source: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(source.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(str(source), "", f"not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(str(source), "", "a profile must be a mapping")
    return data


def _leaves(value: Any, key: str) -> list[str]:
    """The dotted keys of the values in ``value`` at ``key`` (a non-empty mapping: its leaves; else ``key``)."""
    if isinstance(value, dict) and value:
        return [leaf for k, v in value.items() for leaf in _leaves(v, f"{key}.{k}")]
    return [key]


def merge_profiles(base: dict[str, Any], over: dict[str, Any], origins: dict[str, str] | None = None,
                   over_source: str = "", prefix: str = "") -> dict[str, Any]:
    """``over`` deep-merged over ``base`` (neither changed): mappings merge key by key, anything else (a list, a
    scalar, ``null``) replaces. ``origins`` (dotted key -> file), when given, is updated to name ``over_source``
    for every value ``over`` set.

    Usage: ``merge_profiles({"sft": {"lr": 1, "caps": [1]}}, {"sft": {"caps": [2]}})`` ->
    ``{"sft": {"lr": 1, "caps": [2]}}``"""
    out = dict(base) if prefix else copy.deepcopy(base)  # (nested calls work on the top call's copy)
    for k, v in over.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_profiles(out[k], v, origins, over_source, key + ".")
            continue
        out[k] = copy.deepcopy(v)
        if origins is not None:
            for o in [o for o in origins if o == key or o.startswith(key + ".")]:
                del origins[o]
            origins.update(dict.fromkeys(_leaves(v, key), over_source))
    return out


def _load_tree(source: Path, chain: list[Path]) -> tuple[dict[str, Any], dict[str, str], list[Path]]:
    """The data of the profile file ``source`` with its ``include`` (recursively) merged under it, the file of
    each dotted value, and the included files (nearest first); ``chain``: the files including this one."""
    data = _read_profile(source)
    inc = data.pop("include", None)
    if inc is None:
        return data, {leaf: str(source) for k, v in data.items() for leaf in _leaves(v, str(k))}, []
    if not isinstance(inc, str) or not inc.strip():
        raise ConfigError(str(source), "include", f"expected a profile name or path, got {inc!r}")
    try:
        inc_source = profile_source(inc, source.parent)
    except FileNotFoundError as e:
        raise ConfigError(str(source), "include", str(e)) from None
    path = [*chain, source]
    if inc_source in path:
        cycle = [*path[path.index(inc_source):], inc_source]
        raise ConfigError(str(source), "include", "include cycle: " + " -> ".join(str(p) for p in cycle))
    base, origins, includes = _load_tree(inc_source, [*chain, source])
    for k in ("name", "description"):  # never inherited: the including file's own (or the defaults)
        base.pop(k, None)
        origins.pop(k, None)
    merged = merge_profiles(base, data, origins, str(source))
    return merged, origins, [inc_source, *includes]


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
    A file's ``include`` is loaded first and the file merged over it (:func:`merge_profiles`).
    """
    source = profile_source(name_or_path, base_dir)
    data, origins, includes = _load_tree(source, [])
    overrides = dict(overrides or {})
    prof = Profile(name=str(data.get("name") or source.stem), source=source, data=data,
                   run_root=Path(run_root) if run_root else default_run_root(), overrides=overrides,
                   override_labels=dict(override_labels or {}), includes=includes,
                   origins=origins if includes else {})
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
              + (f"; includes {', '.join(map(str, prof.includes))}" if prof.includes else "")
              + (f"; overrides {overrides}" if overrides else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
