"""DPO on long-writing preference pairs (the paper's Section 4.3, "LongWriter-9B-DPO").

Data, as the paper builds it:
  1. long-writing instructions from the instruction source of notebook 02
     (:func:`lwlib.instructions.generate_instructions` with a seed of its own, so the set differs from
     the AgentWrite one; checked against LongBench-Write prompts, which are never used);
  2. ``samples`` outputs per instruction (paper: 4) sampled from the SFT model (notebook 03) under one of the
     profile's named decodings (``decoding``; the small-model profiles: ``loopfree``, see :class:`DPOStageConfig`);
  3. every output scored: quality ``S_q`` from the LongBench-Write LLM judge (:mod:`lwlib.judge`: the judging
     loop :func:`lwlib.judge.judge_records` with its cache ``judge_cache.jsonl``, and
     :func:`lwlib.judge.quality_score`) and length ``S_l`` (:func:`lwlib.scoring.length_score` against the
     instruction's required length, on *effective* length by
     default: words before a collapse into repetition, so a loop is not rewarded), combined by the
     documented rule of :class:`DPOStageConfig` (``score_rule``); without a judge (``judge.kind: none``) the
     pairs rest on length alone, and every table says so (``rule``);
  4. chosen = the best-scoring output (ties: a seeded draw among the tied best), rejected = one of the
     others drawn at random (seeded per instruction); pairs whose two scores are equal carry no
     preference and are dropped (``drop_ties``);
  5. optionally mixed with general preference pairs (the paper: ~50k general + ~4k long-writing).

Training: TRL's ``DPOTrainer`` (TRL 1.x: ``processing_class``; ``DPOConfig.max_length`` only) from the
SFT checkpoint, with a frozen copy of it as the reference. ``max_length`` is set from the data (the
longest prompt + response in tokens), capped by ``max_length`` of the config; how many pairs the cap
truncates is reported in ``length_plan.json``, never silent. TRL's trainer is used as it is (its DPO loss,
collator and padded batches); around it, the helpers shared with SFT (:mod:`lwlib.training`: batch plan,
DeepSpeed and checkpointing arguments, saving the result) and the attention for padded batches
(:func:`lwlib.attention.pick_padded_attn`).

Run folder ``<run>/dpo/``: ``instructions.jsonl``, ``samples.jsonl`` (resumable), ``scores.jsonl``
(resumable; judge outputs kept), ``judge_cache.jsonl`` (judge calls by judge model, prompt and response),
``pairs.jsonl``, ``data_stats.json``, ``model/``, ``train_log.json``.

Seeds (``seeds``): seed ``k >= 1`` starts from seed k's SFT model (``sft-s<k>``; :func:`start_tag`), samples and
pairs with seed ``profile.seed + k`` and trains with it, in ``<run>/dpo/s<k>/`` (:func:`dpo_dir`); its model is
the tag ``dpo-s<k>``. The instructions are the same for every seed (``instructions.jsonl`` and the judge cache stay
in ``<run>/dpo/``).

Usage::

    cfg = prof.section("dpo", DPOStageConfig)
    for k in range(cfg.seeds):
        pairs, stats = build_dpo_data(prof, cfg, seed=k)  # sample, judge, pair (resumable)
        folder = train_dpo(prof, cfg, pairs, seed=k)      # runs/<profile>/dpo/model, dpo/s1/model, ...
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .backends import Backend, BackendConfig, Generation, make_backend, samples_params
from .config import Profile
from .typed import check_sizes
from .data import is_hf_spec, parse_hf_spec
from .decodings import Decoding, get_decoding
from .generation import Job, generate_into
from .judge import Judged, JudgeConfig, JudgeResult, close_judge, judge_cache, judge_records, make_judge, quality_score
from .plots import pyplot, save_figure
from .progress import console_callback
from .runs import (JsonlStore, atomic_write_json, atomic_write_jsonl, fingerprint_id, model_fingerprint, read_jsonl,
                   read_log_history, read_records, training_finished, write_manifest)
from .scoring import length_score
from .text import repetition_report

SCORE_RULES = ("mean", "weighted", "length", "quality")


@dataclass
class DPOStageConfig:
    """Section ``dpo`` of a profile.

    Data fields:
        start_model: the policy's starting point and frozen reference: ``sft`` (notebook 03's checkpoint,
            the paper's), ``base`` or a path (tests use ``base`` when no SFT checkpoint exists).
        instructions: number of long-writing instructions (paper: ~4k pairs in all).
        instruction_seed_offset: the instructions are ``generate_instructions(n, seed=profile.seed + offset)``;
            an offset distinct from notebook 02's keeps the DPO set apart from the AgentWrite set.
        languages: instruction languages (``en``, ``zh``).
        min_words, max_words: range of the instructions' required lengths (log-uniform).
        samples: outputs sampled per instruction (paper: 4).
        max_new_tokens: token budget per sampled output.
        decoding: the profile decoding (:mod:`lwlib.decodings`) the samples are drawn with; null = the profile's
            first. The small-model profiles sample under ``loopfree``: under the paper's decoding a 135M model runs
            on to the token limit in loops in almost every sample, so the 4 samples of an instruction have equal
            length scores and a pair carries no length preference.
        temperature: overrides the decoding's temperature for sampling (not stated in the paper; higher values
            give more variety between the samples); null = the decoding's.
        length_basis: ``effective`` (default): the length score is computed on effective length, the words written
            before the text collapses into repetition (:func:`lwlib.text.repetition_report`), so a loop that
            runs to the required length is not preferred; ``raw``: on all output words (the official scorer).
        backend: generation backend for sampling (lwlib.backends.BackendConfig; model = start model).
        judge: the quality judge: ``lwlib.judge.JudgeConfig`` (kind ``local`` = the "local judge", a local
            model through ``lwlib.serve``; ``openai`` = any OpenAI-compatible API, the paper's GPT-4o;
            ``none`` = no quality, scores from length alone), built by ``lwlib.judge.make_judge``.
        score_rule: how quality ``S_q`` and length ``S_l`` (both 0-100) combine into the score:
            ``mean`` = (S_l + S_q) / 2 (LongBench-Write's overall score S; default), ``weighted`` =
            quality_weight * S_q + (1 - quality_weight) * S_l, ``length`` = S_l only, ``quality`` = S_q only.
            Fallback when the judge fails (no parseable answer after ``judge.max_tries``, common with
            a 135M local judge) or ``judge.kind: none``: if ANY output of an instruction lacks a quality
            score, ALL outputs of that instruction are scored by S_l alone (so that outputs are compared
            on the same scale); each score record says which rule produced it (``rule``). Under
            ``quality`` such instructions are skipped.
        quality_weight: weight of S_q under ``weighted``.
        drop_ties: drop pairs whose chosen and rejected scores are equal (no preference).
        general_data: general preference pairs to mix in: a JSONL path with ``prompt``/``chosen``/
            ``rejected`` (strings or message lists), ``hf:<dataset id>[:<config>][@<split>]`` (same columns; split
            default ``train``; lwlib.data.parse_hf_spec), or null.
        general_per_long: general pairs per long-writing pair (paper: ~50k / ~4k, about 12).
        general_max: upper bound on general pairs (null = none).

    Training fields (TRL ``DPOConfig``; the paper gives only the step count):
        steps: optimizer steps (paper: 250).
        beta: DPO beta (not in the paper; 0.1, the DPO paper's / TRL's default).
        learning_rate: peak learning rate (not in the paper; 1e-6, TRL's DPO default).
        batch_size: pairs per optimizer step over all devices.
        per_device_batch_size: pairs per device per micro-step (gradient accumulation makes up the rest).
        max_length: upper bound on prompt + response tokens; the trainer's max_length is the longest
            pair in the data, up to this bound (pairs above it are truncated and counted); null = no bound.
        lr_scheduler: learning-rate schedule (``cosine``, ``linear``, ``constant`` ...).
        warmup_ratio: warmup fraction of the steps.
        weight_decay: AdamW weight decay.
        max_grad_norm: gradient clipping.
        gradient_checkpointing: recompute activations in the backward pass.
        deepspeed: DeepSpeed config path (relative to the repo) or null; with it TRL builds the reference.
        logging_steps: log loss / rewards every N steps.
        overwrite: retrain even if ``model/`` exists; and when the stored instructions, samples or scores
            were made with other settings (start model, decoding, instruction generator, judge;
            lwlib.runs.StaleRunError), move them aside and start anew instead of refusing.

        seeds: DPO runs, seed k from seed k's SFT model (``sft-s<k>``; the gpu design's 3); each has its own
            samples, pairs and model (``dpo-s<k>``), the instructions are shared.

    Evaluation fields (notebook 04):
        bench_items: LongBench-Write items predicted and judged for SFT vs DPO (null = all 120); the samples per
            item are ``bench.samples``.
    """

    start_model: str = "sft"
    instructions: int = 1000
    instruction_seed_offset: int = 1000
    languages: list[str] = field(default_factory=lambda: ["en", "zh"])
    min_words: int = 2000
    max_words: int = 20000
    samples: int = 4
    max_new_tokens: int = 32768
    decoding: str | None = None
    temperature: float | None = None
    length_basis: str = "effective"
    backend: BackendConfig = field(default_factory=BackendConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    score_rule: str = "mean"
    quality_weight: float = 0.5
    drop_ties: bool = True
    general_data: str | None = None
    general_per_long: float = 12.0
    general_max: int | None = None
    steps: int = 250
    beta: float = 0.1
    learning_rate: float = 1e-6
    batch_size: int = 16
    per_device_batch_size: int = 1
    max_length: int | None = 32768
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = True
    deepspeed: str | None = None
    logging_steps: int = 1
    overwrite: bool = False
    seeds: int = 1
    bench_items: int | None = None

    def __post_init__(self) -> None:
        check_sizes(self, "dpo", 1, "instructions", "min_words", "max_words", "max_new_tokens", "steps", "batch_size",
                    "per_device_batch_size", "max_length", "logging_steps", "seeds", "bench_items")
        check_sizes(self, "dpo", 0, "general_per_long", "general_max")
        if self.score_rule not in SCORE_RULES:
            raise ValueError(f"dpo.score_rule must be one of {SCORE_RULES}, got {self.score_rule!r}")
        if not 0.0 <= self.quality_weight <= 1.0:
            raise ValueError(f"dpo.quality_weight must be in [0, 1], got {self.quality_weight}")
        if self.samples < 2:
            raise ValueError(f"dpo.samples must be >= 2 (a pair needs two outputs), got {self.samples}")
        if self.batch_size % self.per_device_batch_size:
            raise ValueError("dpo.batch_size must be a multiple of dpo.per_device_batch_size")
        if self.length_basis not in ("effective", "raw"):
            raise ValueError(f"dpo.length_basis must be 'effective' or 'raw', got {self.length_basis!r}")
        if self.judge.kind not in ("local", "openai", "none"):
            raise ValueError(f"dpo.judge.kind must be local, openai or none, got {self.judge.kind!r}")


# ------------------------------------------------------------------------------------------------ seeds

def dpo_dir(prof: Profile, seed: int = 0) -> Path:
    """The folder of DPO seed ``seed``: ``<run>/dpo`` for 0, ``<run>/dpo/s<k>`` after (created).

    Usage: ``dpo_dir(prof, 2)  # runs/gpu/dpo/s2``
    """
    if seed < 0:
        raise ValueError(f"DPO seed index must be >= 0, got {seed}")
    p = prof.stage_dir("dpo") / (f"s{seed}" if seed else "")
    p.mkdir(parents=True, exist_ok=True)
    return p


def start_tag(cfg: DPOStageConfig, seed: int = 0) -> str:
    """The start model of DPO seed ``seed``: seed k of notebook 03's run ``cfg.start_model`` (``sft`` -> ``sft-s2``);
    ``base`` or a path stays itself (the seeds then differ in sampling and training only).

    Usage: ``run_model(prof, start_tag(cfg, 1))``
    """
    from .models import seed_tag, sft_folder, split_seed

    tag = cfg.start_model
    if split_seed(tag)[1]:  # a seed's run already
        return tag
    try:
        sft_folder(".", tag)  # a tag of notebook 03's runs (ValueError for base, a path or anything else)
    except ValueError:
        return tag
    return seed_tag(tag, seed)


# ------------------------------------------------------------------------------------------ instructions

def dpo_instructions(prof: Profile, cfg: DPOStageConfig) -> list[dict[str, Any]]:
    """The DPO instructions (records with id, prompt, type, lang, length); never LongBench-Write."""
    from .data import load_longbench_write
    from .instructions import check_no_benchmark_leak, generate_instructions

    ins = generate_instructions(cfg.instructions, seed=prof.seed + cfg.instruction_seed_offset,
                                languages=tuple(cfg.languages), min_words=cfg.min_words, max_words=cfg.max_words)
    try:
        bench = [it.prompt for it in load_longbench_write()]
    except FileNotFoundError:
        bench = []
    check_no_benchmark_leak(ins, bench)
    return [i.as_dict() for i in ins]


# ------------------------------------------------------------------------------------------- sampling

def sample_outputs(prof: Profile, cfg: DPOStageConfig, instructions: list[dict[str, Any]],
                   backend: Backend | None = None, seed: int = 0) -> pd.DataFrame:
    """``cfg.samples`` outputs per instruction from seed ``seed``'s start model under ``cfg.decoding``; resumable
    (``samples.jsonl`` of :func:`dpo_dir`, id ``<instruction id>-s<k>``)."""
    from .models import run_model

    dec = sampling_decoding(prof, cfg)
    store = _samples_store(prof, cfg, seed)
    params = samples_params(dec.params(cfg.max_new_tokens, seed=prof.seed + seed), cfg.samples)
    start = start_tag(cfg, seed)

    def record(g: Generation, it: dict[str, Any], k: int) -> dict[str, Any]:
        rep = repetition_report(g.text)
        return {"id": f"{it['id']}-s{k}", "instruction_id": it["id"], "sample": k,
                "prompt": it["prompt"], "type": it["type"], "lang": it["lang"],
                "required_length": it["length"], "response": g.text, "words": rep.words,
                "effective_words": rep.effective_words, "collapsed": rep.collapsed,
                "tokens": g.completion_tokens, "finish_reason": g.finish_reason,
                "model": start, "decoding": dec.name}

    jobs = [Job(f"{it['id']}-s{k}", [{"role": "user", "content": it["prompt"]}], params[k], store,
                functools.partial(record, it=it, k=k)) for it in instructions for k in range(cfg.samples)]
    generate_into(jobs, backend, make=lambda: make_backend(cfg.backend, run_model(prof, start), prof.device, prof.dtype),
                  desc=f"DPO sampling ({start}, {dec.name})", what=f"DPO sampling ({start})")
    want = {f"{it['id']}-s{k}" for it in instructions for k in range(cfg.samples)}
    return pd.DataFrame([r for r in store.records() if r["id"] in want])


def sampling_decoding(prof: Profile, cfg: DPOStageConfig) -> Decoding:
    """The decoding DPO samples with: the profile's ``cfg.decoding``, its temperature replaced by
    ``cfg.temperature`` where that is set."""
    dec = get_decoding(prof, cfg.decoding)
    return dataclasses.replace(dec, temperature=cfg.temperature) if cfg.temperature is not None else dec


def _instructions_fingerprint(prof: Profile, cfg: DPOStageConfig) -> dict[str, Any]:
    # generate_instructions is prefix-stable in n, so the count is not part of it
    return {"seed": prof.seed + cfg.instruction_seed_offset, "languages": list(cfg.languages),
            "min_words": cfg.min_words, "max_words": cfg.max_words}


def _samples_fingerprint(prof: Profile, cfg: DPOStageConfig, seed: int = 0) -> dict[str, Any]:
    from .models import run_model

    return {"model": model_fingerprint(cfg.backend.model or run_model(prof, start_tag(cfg, seed)), prof.run_dir),
            "max_new_tokens": cfg.max_new_tokens, "decoding": sampling_decoding(prof, cfg).as_dict(),
            "seed": prof.seed + seed, "instructions": _instructions_fingerprint(prof, cfg),
            **(prof.numerics() if cfg.backend.kind == "local" else {})}  # a local model's device and dtype


def _samples_store(prof: Profile, cfg: DPOStageConfig, seed: int = 0) -> JsonlStore:
    return JsonlStore(dpo_dir(prof, seed) / "samples.jsonl", key="id",
                      fingerprint=_samples_fingerprint(prof, cfg, seed), overwrite=cfg.overwrite, stage="dpo")


def _scores_store(prof: Profile, cfg: DPOStageConfig, seed: int = 0) -> JsonlStore:
    j = cfg.judge
    judge = {"kind": j.kind, "model": (model_fingerprint(j.model or prof.model, prof.run_dir) if j.kind == "local"
                                       else j.model), "base_url": j.base_url, "max_tokens": j.max_tokens,
             "temperature": j.temperature, "max_tries": j.max_tries, "max_response_words": j.max_response_words}
    return JsonlStore(dpo_dir(prof, seed) / "scores.jsonl", key="id", overwrite=cfg.overwrite, stage="dpo",
                      fingerprint={"samples": fingerprint_id(_samples_fingerprint(prof, cfg, seed)), "judge": judge,
                                   "seed": prof.seed, "length_basis": cfg.length_basis})


# -------------------------------------------------------------------------------------------- scoring

def make_dpo_judge(prof: Profile, cfg: DPOStageConfig):
    """The judge backend of ``dpo.judge`` (None for ``judge.kind: none``), from :func:`lwlib.judge.make_judge`."""
    return make_judge(prof, cfg.judge, where="dpo.judge")


def judge_samples(prof: Profile, cfg: DPOStageConfig, samples: pd.DataFrame, judge=None,
                  seed: int = 0) -> pd.DataFrame:
    """Quality and length scores of every sample; resumable (``<run>/dpo/scores.jsonl``).

    Each record: id, instruction_id, length_score, quality_scores (six dimensions or null), quality
    (0-100 or null), judge (label), judge_tries, judge_outputs, judge_model, judge_truncated, judge_cached.
    Judged by :func:`lwlib.judge.judge_records` (as the benchmark's judgements): judge calls are cached in
    ``<run>/dpo/judge_cache.jsonl``, and a sample stored with another judge model's scores is an error. A
    transport error leaves the sample unscored (retried on rerun)."""
    store = _scores_store(prof, cfg, seed)
    records = samples.to_dict("records")
    todo = [r for r in records if r["id"] not in store]
    own = None
    if todo and judge is None and cfg.judge.kind != "none":
        judge = own = make_dpo_judge(prof, cfg)
    if judge is not None:  # a given judge is checked against the stored scores even when none is missing
        try:
            cache = judge_cache(prof.stage_dir("dpo") / "judge_cache.jsonl", cfg.judge, prof.seed, stage="dpo",
                                overwrite=cfg.overwrite) if todo else None
            errors = judge_records(records, judge, cfg.judge, store,
                                   lambda j: _score_record(j.record, cfg.length_basis, j), cache, seed=prof.seed,
                                   desc="DPO judge")
        finally:
            close_judge(own)
        if errors:
            raise RuntimeError(f"DPO judge: {len(errors)} calls failed (rerun to retry them): "
                               f"{[f'{i}: {res.error}' for i, res in errors.items()][:3]}")
    else:
        for r in todo:
            store.append(_score_record(r, cfg.length_basis))
    want = set(samples["id"])
    return pd.DataFrame([r for r in store.records() if r["id"] in want])


def _score_record(r: dict, length_basis: str = "effective", judged: Judged | None = None) -> dict:
    """A sample's score record: its length score on ``length_basis`` words and, when ``judged``, the judge's
    scores (without a judge: quality null, judge ``none``)."""
    j = judged or Judged(r, JudgeResult(None, 0, []), judge_model="none", label="none", truncated=False, cached=False)
    words = r["effective_words"] if length_basis == "effective" else r["words"]
    scores = j.result.scores
    return {"id": r["id"], "instruction_id": r["instruction_id"], "required_length": r["required_length"],
            "words": r["words"], "length_basis": length_basis, "scored_words": words,
            "length_score": length_score(r["required_length"], words),
            "quality_scores": scores, "quality": quality_score(scores) if scores else None,
            "judge": j.label, "judge_tries": j.result.tries, "judge_outputs": j.result.outputs,
            "judge_model": j.judge_model, "judge_truncated": j.truncated, "judge_cached": j.cached}


def combine_scores(scores: pd.DataFrame, rule: str = "mean", quality_weight: float = 0.5) -> pd.DataFrame:
    """Add ``score`` and ``rule`` columns (see ``DPOStageConfig.score_rule`` for the rule and the
    length-only fallback, applied per instruction). Rows of instructions that cannot be scored under
    ``quality`` get ``score`` NaN."""
    if rule not in SCORE_RULES:
        raise ValueError(f"score rule must be one of {SCORE_RULES}, got {rule!r}")
    df = scores.copy()
    df["score"] = float("nan")
    df["rule"] = ""
    for _, g in df.groupby("instruction_id", sort=False):
        q = g["quality"]
        complete = bool(q.notna().all())
        for idx in g.index:
            sl, sq = float(df.at[idx, "length_score"]), df.at[idx, "quality"]
            if rule == "length":
                s, how = sl, "length"
            elif not complete:
                s, how = (float("nan"), "skipped: quality missing") if rule == "quality" else \
                    (sl, "length only (quality missing)")
            elif rule == "mean":
                s, how = (sl + float(sq)) / 2.0, "mean"
            elif rule == "weighted":
                s, how = quality_weight * float(sq) + (1 - quality_weight) * sl, f"weighted q={quality_weight}"
            else:
                s, how = float(sq), "quality"
            df.at[idx, "score"] = s
            df.at[idx, "rule"] = how
    return df


def make_pairs(scored: pd.DataFrame, seed: int = 0, drop_ties: bool = True) -> tuple[list[dict], list[dict]]:
    """Pairs from scored samples: per instruction, chosen = the highest ``score`` (ties among the best:
    a seeded draw), rejected = one of the other samples drawn at random. The draws use a generator
    seeded by (seed, instruction id), so a pair does not depend on other instructions or on order.

    Returns ``(pairs, skipped)``; a pair is ``{instruction_id, chosen_id, rejected_id, chosen_score,
    rejected_score, tie_break}``; skipped records say why (fewer than 2 scored samples, tie)."""
    pairs, skipped = [], []
    for iid, g in scored.groupby("instruction_id", sort=True):
        g = g[g["score"].notna()].sort_values("id")
        if len(g) < 2:
            skipped.append({"instruction_id": iid, "reason": f"{len(g)} scored samples"})
            continue
        rng = random.Random(f"{seed}:{iid}")
        best = g["score"].max()
        tops = list(g.loc[g["score"] == best, "id"])
        chosen = rng.choice(tops)
        rejected = rng.choice([i for i in g["id"] if i != chosen])
        rs = float(g.loc[g["id"] == rejected, "score"].iloc[0])
        if drop_ties and rs == best:
            skipped.append({"instruction_id": iid, "reason": "tie: the rejected sample scores as high as the chosen"})
            continue
        pairs.append({"instruction_id": iid, "chosen_id": chosen, "rejected_id": rejected,
                      "chosen_score": float(best), "rejected_score": rs, "tie_break": len(tops) > 1})
    return pairs, skipped


# ------------------------------------------------------------------------------------ general pairs

def _as_turns(x: Any, role: str, where: str) -> list[dict[str, str]]:
    if isinstance(x, str):
        return [{"role": role, "content": x}]
    if isinstance(x, list) and x and all(isinstance(m, dict) and "role" in m and "content" in m for m in x):
        return [{"role": m["role"], "content": m["content"]} for m in x]
    raise ValueError(f"{where}: expected a string or a list of messages")


def load_general_pairs(src: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` general preference pairs (conversational ``prompt``/``chosen``/``rejected``) from a JSONL
    path or ``hf:<id>[:<config>][@<split>]`` (:func:`lwlib.data.parse_hf_spec`); shuffled with ``seed``."""
    if n <= 0:
        return []
    if is_hf_spec(src):
        ds = parse_hf_spec(src, "dpo.general_data").load()
        missing = {"prompt", "chosen", "rejected"} - set(ds.column_names)
        if missing:
            raise ValueError(f"dpo.general_data {src!r}: missing column(s) {sorted(missing)}")
        rows = list(ds.shuffle(seed=seed).select(range(min(n, len(ds)))))
        where = src
    else:
        rows = read_jsonl(src)
        random.Random(seed).shuffle(rows)
        rows = rows[:n]
        where = src
    out = []
    for k, r in enumerate(rows):
        w = f"{where}[{k}]"
        for c in ("prompt", "chosen", "rejected"):
            if c not in r:
                raise ValueError(f"{w}: missing field {c!r}")
        out.append({"prompt": _as_turns(r["prompt"], "user", w + ".prompt"),
                    "chosen": _as_turns(r["chosen"], "assistant", w + ".chosen"),
                    "rejected": _as_turns(r["rejected"], "assistant", w + ".rejected"),
                    "source": "general"})
    return out


# ----------------------------------------------------------------------------------------- the data

def build_dpo_data(prof: Profile, cfg: DPOStageConfig | None = None, backend: Backend | None = None,
                   judge=None, seed: int = 0) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Instructions -> samples -> scores -> pairs (+ general pairs) of DPO seed ``seed``; resumable.

    Returns (training pairs in TRL's conversational format with ids and scores, statistics); writes
    ``pairs.jsonl`` and ``data_stats.json`` in :func:`dpo_dir`."""
    cfg = cfg or prof.section("dpo", DPOStageConfig)
    out = dpo_dir(prof, seed)
    ins_store = JsonlStore(prof.stage_dir("dpo") / "instructions.jsonl", key="id",
                           fingerprint=_instructions_fingerprint(prof, cfg), overwrite=cfg.overwrite, stage="dpo")
    _samples_store(prof, cfg, seed), _scores_store(prof, cfg, seed)  # settings checked before the manifest
    write_manifest(out, {"profile": prof.resolved(), "dpo": dataclasses.asdict(cfg), "seed_index": seed,
                         "start_model": start_tag(cfg, seed)}, name="manifest_data.json")
    instructions = dpo_instructions(prof, cfg)
    for it in instructions:
        if it["id"] not in ins_store:
            ins_store.append(it)
    samples = sample_outputs(prof, cfg, instructions, backend, seed)
    scores = judge_samples(prof, cfg, samples, judge, seed)
    scored = combine_scores(scores, cfg.score_rule, cfg.quality_weight)
    pairs, skipped = make_pairs(scored, prof.seed + seed, cfg.drop_ties)
    by_id = samples.set_index("id")
    sc = scored.set_index("id")
    long_pairs = []
    for p in pairs:
        c, r = by_id.loc[p["chosen_id"]], by_id.loc[p["rejected_id"]]
        long_pairs.append({**p, "source": "long-writing", "required_length": int(c["required_length"]),
                           "chosen_words": int(c["words"]), "rejected_words": int(r["words"]),
                           "chosen_quality": _nan_none(sc.at[p["chosen_id"], "quality"]),
                           "rejected_quality": _nan_none(sc.at[p["rejected_id"], "quality"]),
                           "chosen_length_score": float(sc.at[p["chosen_id"], "length_score"]),
                           "rejected_length_score": float(sc.at[p["rejected_id"], "length_score"]),
                           "rule": sc.at[p["chosen_id"], "rule"],
                           "prompt": [{"role": "user", "content": c["prompt"]}],
                           "chosen": [{"role": "assistant", "content": c["response"]}],
                           "rejected": [{"role": "assistant", "content": r["response"]}]})
    n_gen = 0
    general = []
    if cfg.general_data:
        n_gen = math.ceil(cfg.general_per_long * len(long_pairs))
        if cfg.general_max is not None:
            n_gen = min(n_gen, cfg.general_max)
        general = load_general_pairs(cfg.general_data, n_gen, prof.seed + seed)
    data = long_pairs + general
    atomic_write_jsonl(out / "pairs.jsonl", data)
    n_quality = int(scores["quality"].notna().sum()) if len(scores) else 0
    stats = {"seed_index": seed, "start_model": start_tag(cfg, seed), "instructions": len(instructions),
             "samples": int(len(samples)), "judged_with_quality": n_quality,
             "quality_missing": int(len(scores) - n_quality),
             "score_rule": cfg.score_rule, "rules_used": scored["rule"].value_counts().to_dict(),
             "long_pairs": len(long_pairs), "skipped_instructions": skipped,
             "tie_broken_pairs": int(sum(p["tie_break"] for p in pairs)),
             "general_source": cfg.general_data, "general_pairs": len(general),
             "mean_chosen_score": float(pd.Series([p["chosen_score"] for p in pairs]).mean()) if pairs else None,
             "mean_rejected_score": float(pd.Series([p["rejected_score"] for p in pairs]).mean()) if pairs else None}
    atomic_write_json(out / "data_stats.json", stats)
    return data, stats


def _nan_none(x: Any) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def load_scored(prof: Profile, cfg: DPOStageConfig | None = None, seed: int = 0) -> pd.DataFrame:
    """Every sample of DPO seed ``seed`` with its scores and the rule that produced them (from the run folder)."""
    cfg = cfg or prof.section("dpo", DPOStageConfig)
    run = dpo_dir(prof, seed)
    for f in ("samples.jsonl", "scores.jsonl"):
        if not (run / f).exists():
            raise FileNotFoundError(f"{run / f} does not exist: run build_dpo_data (notebook 04) first")
    samples = pd.DataFrame(read_records(run / "samples.jsonl"))  # a key twice is an error, not two rows
    scores = combine_scores(pd.DataFrame(read_records(run / "scores.jsonl")), cfg.score_rule, cfg.quality_weight)
    cols = ["id", "length_score", "quality", "score", "rule", "judge", "judge_tries"]
    return samples[["id", "instruction_id", "sample", "required_length", "words", "effective_words", "tokens",
                    "finish_reason"]].merge(
        scores[cols], on="id", how="left")


def load_pairs(prof: Profile, seed: int = 0) -> list[dict[str, Any]]:
    """The pairs of :func:`build_dpo_data` (``pairs.jsonl`` of :func:`dpo_dir`)."""
    path = dpo_dir(prof, seed) / "pairs.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run build_dpo_data (notebook 04) first")
    return read_jsonl(path)


# -------------------------------------------------------------------------------------------- lengths

def _ids(x: Any) -> list[int]:
    if isinstance(x, dict) or hasattr(x, "keys"):
        x = x["input_ids"]
    return list(x)


def pair_token_lengths(tok, pairs: list[dict[str, Any]]) -> list[int]:
    """Tokens of the longer of prompt + chosen and prompt + rejected, per pair (chat-formatted)."""
    return [max(len(_ids(tok.apply_chat_template(p["prompt"] + p[side], tokenize=True)))
                for side in ("chosen", "rejected")) for p in pairs]


def length_plan(lengths: list[int], cap: int | None) -> dict[str, int | None]:
    """The trainer's ``max_length``: the longest pair, up to ``cap``; and how many pairs the cap cuts."""
    if not lengths:
        raise ValueError("no DPO pairs")
    longest = max(lengths)
    use = longest if cap is None else min(longest, cap)
    return {"longest_pair_tokens": longest, "max_length": use, "cap": cap,
            "truncated_pairs": sum(1 for x in lengths if x > use)}


# ------------------------------------------------------------------------------------------- training

def train_dpo(prof: Profile, cfg: DPOStageConfig | None = None, pairs: list[dict[str, Any]] | None = None,
              out_dir: str | Path | None = None, seed: int = 0) -> Path:
    """DPO-train seed ``seed``'s start model on ``pairs`` (default: its ``pairs.jsonl``) with TRL's ``DPOTrainer``
    and a frozen reference (a copy of the start model), trainer seed ``profile.seed + seed``; returns the checkpoint
    folder (model + tokenizer; default ``model/`` in :func:`dpo_dir`).

    Writes ``train_log.json`` (log history: loss, rewards/margins, rewards/accuracies ...) and
    ``length_plan.json`` beside the folder. A finished model is reused unless ``cfg.overwrite``."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from .attention import pick_padded_attn
    from .models import load_tokenizer, resolve_model, run_model
    from .training import (accelerate_setup, batch_plan, checkpointing_args, deepspeed_config, prepare_run,
                           save_trained, step_timer, warmup_steps)

    cfg = cfg or prof.section("dpo", DPOStageConfig)
    out_dir = Path(out_dir) if out_dir else dpo_dir(prof, seed) / "model"
    run = out_dir.parent
    run.mkdir(parents=True, exist_ok=True)
    if training_finished(out_dir) and not cfg.overwrite:
        return out_dir
    pairs = pairs if pairs is not None else load_pairs(prof, seed)
    if not pairs:
        raise ValueError("no DPO pairs to train on (see data_stats.json: skipped instructions)")
    start = resolve_model(run_model(prof, start_tag(cfg, seed)))
    tok = load_tokenizer(start)
    tok.padding_side = "right"
    plan = length_plan(pair_token_lengths(tok, pairs), cfg.max_length)
    atomic_write_json(run / "length_plan.json", plan)
    if plan["truncated_pairs"]:
        print(f"note: {plan['truncated_pairs']} of {len(pairs)} pairs are longer than dpo.max_length="
              f"{cfg.max_length} tokens and are truncated (longest: {plan['longest_pair_tokens']})")

    cuda = torch.cuda.is_available() and prof.device != "cpu"
    _, accumulation = batch_plan(cfg.batch_size, cfg.per_device_batch_size, "dpo")
    ds_cfg = deepspeed_config(cfg.deepspeed)
    prepare_run(ds_cfg)  # this run's own DeepSpeed and world, not an earlier run's in this process
    args = DPOConfig(
        output_dir=str(run / "checkpoints"), per_device_train_batch_size=cfg.per_device_batch_size,
        gradient_accumulation_steps=accumulation, learning_rate=cfg.learning_rate,
        max_steps=cfg.steps, lr_scheduler_type=cfg.lr_scheduler, warmup_steps=warmup_steps(cfg.warmup_ratio, cfg.steps),
        weight_decay=cfg.weight_decay, max_grad_norm=cfg.max_grad_norm, beta=cfg.beta,
        max_length=plan["max_length"], bf16=cuda, fp16=False, use_cpu=not cuda,
        **checkpointing_args(cfg.gradient_checkpointing),
        logging_steps=cfg.logging_steps, save_strategy="no", report_to=[], seed=prof.seed + seed,
        dataloader_num_workers=0, deepspeed=ds_cfg, disable_tqdm=False,
    )
    attn = pick_padded_attn(prof.device)
    model = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32, attn_implementation=attn)
    model.config.use_cache = False
    ref = None
    if not ds_cfg:  # a frozen copy of the start model; with DeepSpeed TRL builds (and shards) it
        ref = copy.deepcopy(model)
        ref.requires_grad_(False)
        ref.eval()
    cols = ("prompt", "chosen", "rejected")
    ds = Dataset.from_list([{c: p[c] for c in cols} for p in pairs])
    trainer = DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=ds, processing_class=tok)
    trainer.add_callback(console_callback(f"dpo train (seed {seed})" if seed else "dpo train"))
    timer = step_timer(run)
    trainer.add_callback(timer)
    write_manifest(run, {"profile": prof.resolved(), "dpo": dataclasses.asdict(cfg), "seed_index": seed,
                         "start_model": start,
                         "pairs": len(pairs), "length_plan": plan, "attn_implementation": attn,
                         "gradient_accumulation_steps": args.gradient_accumulation_steps})
    with warnings.catch_warnings():
        # TRL's DPOTrainer reads model.is_gradient_checkpointing at every step, which transformers 5.2x
        # deprecates (a FutureWarning per step, in TRL's code, not ours)
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        result = trainer.train()
    return save_trained(trainer, result, model, tok, out_dir, start_model=start, length_plan=plan,
                        step_seconds=timer.seconds, peak_memory=timer.peak_memory,
                        accelerate=accelerate_setup(trainer))


def load_dpo_log(folder: str | Path) -> pd.DataFrame:
    """The training curves (folder with ``train_log.json`` or the model folder): step, loss,
    reward margin, reward accuracy, chosen/rejected rewards."""
    hist = read_log_history(folder, "lwlib.dpo.train_dpo")
    rows = [{"step": h["step"], "loss": h["loss"], "reward_margin": h.get("rewards/margins"),
             "reward_accuracy": h.get("rewards/accuracies"), "reward_chosen": h.get("rewards/chosen"),
             "reward_rejected": h.get("rewards/rejected"), "learning_rate": h.get("learning_rate")}
            for h in hist if "loss" in h]
    return pd.DataFrame(rows)


@torch.no_grad()
def reward_margins(policy, reference, tok, pairs: list[dict[str, Any]], beta: float) -> pd.DataFrame:
    """DPO's implicit rewards of each pair, computed independently of TRL:
    ``r = beta * (log p_policy(y|x) - log p_ref(y|x))`` for chosen and rejected (response tokens and the
    end-of-turn token, via :func:`lwlib.logprobs.token_nll`); margin = r_chosen - r_rejected."""
    from .logprobs import token_nll

    conv = {s: [p["prompt"] + p[s] for p in pairs] for s in ("chosen", "rejected")}
    lp = {}
    for name, m in (("policy", policy), ("ref", reference)):
        for s in ("chosen", "rejected"):
            lp[name, s] = [-float(x.sum()) for x in token_nll(m, tok, conv[s], include_end_token=True,
                                                                  desc=f"logp {name}/{s}")]
    rows = []
    for k in range(len(pairs)):
        rc = beta * (lp["policy", "chosen"][k] - lp["ref", "chosen"][k])
        rr = beta * (lp["policy", "rejected"][k] - lp["ref", "rejected"][k])
        rows.append({"reward_chosen": rc, "reward_rejected": rr, "margin": rc - rr})
    return pd.DataFrame(rows)


def plot_dpo_training(log: pd.DataFrame | dict[str, pd.DataFrame], path: str | Path, title: str) -> Path:
    """Loss, reward margin and reward accuracy against the step (three panels); ``{label: log}`` draws one line per
    run (the DPO seeds), with a legend."""
    plt = pyplot()

    logs = log if isinstance(log, dict) else {"": log}
    fig, axes = plt.subplots(1, 3, figsize=(10, 4.0))
    for ax, col, lab in zip(axes, ("loss", "reward_margin", "reward_accuracy"),
                            ("DPO loss", "reward margin (chosen - rejected)", "reward accuracy")):
        for (name, lg), marker in zip(logs.items(), "osd^v<>"):
            ax.plot(lg["step"], lg[col], marker + "-", ms=3, label=name or None, lw=1.2)
        ax.set_xlabel("step")
        ax.set_title(lab, fontsize=9)
        ax.grid(True, alpha=0.3)
    if len(logs) > 1:
        axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path)
