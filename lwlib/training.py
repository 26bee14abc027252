"""Training helpers shared by the SFT and DPO stages (:mod:`lwlib.sft`, :mod:`lwlib.dpo`); not the command line,
which is :mod:`lwlib.train`.

- :func:`batch_plan`: world size and gradient accumulation for a batch size over the launcher's ranks;
- :func:`warmup_steps`: a warmup ratio as whole steps, rounded down (a tiny run's first step learns);
- :func:`deepspeed_config`: a profile's DeepSpeed config path, resolved against the repository; :func:`launcher_env`:
  the launcher's variables for DeepSpeed in a process started without one (a notebook on one GPU); :func:`prepare_run`:
  what every run does before its ``TrainingArguments`` (accelerate's state reset, those variables, DeepSpeed's
  architecture list);
- :func:`checkpointing_args`: ``TrainingArguments`` keywords for activation checkpointing under either
  transformers name;
- :func:`pick_liger` and :func:`use_liger`: whether Liger-Kernel's Triton kernels run here (``sft.liger_kernel``),
  and patching them into one model instance, the choice per model family in :func:`liger_kernels_for` (the fused
  loss itself: :func:`lwlib.losses.liger_sft_loss`);
- :func:`pick_loss`: which loss kernel a run uses (fused, chunked or full logits), so that large vocabularies at
  long packs never hold the whole logits;
- :func:`save_trained`: the end of a training run, the same for both stages: final model, config and tokenizer
  for generation, ``train_log.json``; :func:`holds_last_step` and :func:`finish_from_checkpoint`: the same end for
  a run stopped after saving its last step's checkpoint (resuming from it would train a step too many);
  :func:`release_deepspeed`: a finished run's DeepSpeed engines let go (ZeRO-3 kept them for the process's life);
- :func:`step_timer`: a callback that records each optimizer step's wall time (``train_log.json``'s
  ``step_seconds``) and the run's peak memory (``peak_memory``: :func:`peak_memory`) and, with
  ``$LWLIB_TRAIN_PROFILE=first:last``, profiles those steps (``train_profile.json``);
- :func:`compare_losses`: two runs' loss curves step by step against a tolerance fixed per precision
  (:data:`LOSS_RTOL`): a DeepSpeed ZeRO-3 run against the plain run on the same data and seed, and the same test
  for any number of ranks.

Usage::

    world, accumulation = batch_plan(cfg.batch_size, cfg.per_device_batch_size, "sft")
    args = TrainingArguments(..., gradient_accumulation_steps=accumulation, deepspeed=deepspeed_config(cfg.deepspeed),
                             **checkpointing_args(cfg.gradient_checkpointing))
    result = trainer.train()
    save_trained(trainer, result, model, tok, out_dir)
"""

from __future__ import annotations

import dataclasses
import gc
import importlib
import importlib.util
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from .runs import REPO_ROOT, atomic_write_json


def quiet_deepspeed_on_cpu() -> None:
    """Name DeepSpeed's CPU accelerator (``$DS_ACCELERATOR=cpu``, unless set) where torch sees no GPU: transformers'
    Trainer imports DeepSpeed where it is installed, whose auto-detection otherwise warns "Setting accelerator to
    CPU" in every training cell of a CPU run; it picks the same accelerator. Called when this module is imported."""
    if "DS_ACCELERATOR" in os.environ or torch.cuda.is_available():
        return
    for name in ("mps", "xpu"):
        backend = getattr(torch.backends, name, None) or getattr(torch, name, None)
        if backend is not None and getattr(backend, "is_available", lambda: False)():
            return
    os.environ["DS_ACCELERATOR"] = "cpu"


quiet_deepspeed_on_cpu()


def batch_plan(batch_size: int, per_device_batch_size: int, section: str) -> tuple[int, int]:
    """``(world size, gradient accumulation steps)`` that make ``batch_size`` items per optimizer step
    from ``per_device_batch_size`` on each of the ``WORLD_SIZE`` ranks (1 without a launcher)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_step = per_device_batch_size * world
    if batch_size % per_step:
        raise ValueError(f"{section}.batch_size {batch_size} is not a multiple of per-device batch x {world} devices")
    return world, batch_size // per_step


def warmup_steps(ratio: float, total_steps: int) -> int:
    """Linear-warmup steps for the warmup ``ratio`` of ``total_steps``, rounded down. transformers rounds up, and a
    schedule's first warmup step has learning rate 0: a 2-step run with the paper's ratio 0.03 got one warmup step
    and learned nothing at its first. Rounded down, a run too short for a whole warmup step has none; longer runs
    keep the ratio to within a step. ``warmup_steps(0.03, 2) == 0``, ``warmup_steps(0.05, 40) == 2``."""
    return int(ratio * total_steps + 1e-9)


def deepspeed_config(path: str | None) -> str | None:
    """A profile's DeepSpeed config path, relative to the repository unless absolute (None: no DeepSpeed)."""
    if not path:
        return None
    p = Path(path)
    return str(p if p.is_absolute() else REPO_ROOT / p)


LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
_LAUNCHER_SET: dict[str, str] = {}  # what launcher_env set in this process (fresh_accelerator_state takes it back)


def launcher_env(ds_cfg: str | None) -> dict[str, str]:
    """DeepSpeed in a process no launcher started (a notebook's kernel on one GPU: ``paper_rehearsal``): set the
    variables a launcher sets, for a world of one (``RANK`` and ``LOCAL_RANK`` 0, ``WORLD_SIZE`` 1, ``MASTER_ADDR``
    127.0.0.1, a free ``MASTER_PORT``); without them accelerate does not start DeepSpeed's process group and
    DeepSpeed looks for MPI (mpi4py, not installed). Sets nothing without ``ds_cfg`` or where any of them is set
    (a launcher's ranks). Returns what it set; :func:`fresh_accelerator_state` takes it back before the next run.

    Usage: ``fresh_accelerator_state(); launcher_env(deepspeed_config(cfg.deepspeed))  # before TrainingArguments``"""
    if not ds_cfg or any(v in os.environ for v in LAUNCHER_VARS):
        return {}
    from .served import free_port

    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    os.environ.update(env)
    _LAUNCHER_SET.update(env)
    return env


def deepspeed_arch_list(ds_cfg: str | None) -> str | None:
    """DeepSpeed 0.19's JIT op builder (FusedAdam, CPU Adam) reads ``TORCH_CUDA_ARCH_LIST`` as numbers: an entry
    with an architecture-specific suffix, as Hopper images set (``9.0a``), fails with ``ValueError: invalid literal
    for int() with base 10: '0a'`` (seen 2026-12-07 on an H100 image, issue 30). With ``ds_cfg``, rewrites such
    entries without the suffix (``9.0a`` -> ``9.0``, ``+PTX`` kept) for this process; returns the new value, None
    where nothing changed.

    Usage: ``deepspeed_arch_list(ds_cfg)  # before the Trainer builds DeepSpeed's ops``"""
    val = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not ds_cfg or not val:
        return None
    out: list[str] = []
    for cc in val.replace(" ", ";").split(";"):
        m = re.fullmatch(r"(\d+)\.(\d+)[a-z]?(\+PTX)?", cc.strip())
        new = f"{m[1]}.{m[2]}{m[3] or ''}" if m else cc.strip()
        if new and new not in out:
            out.append(new)
    if ";".join(out) == val:
        return None
    os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(out)
    print(f"note: TORCH_CUDA_ARCH_LIST={val!r} -> {os.environ['TORCH_CUDA_ARCH_LIST']!r} for DeepSpeed's op builder")
    return os.environ["TORCH_CUDA_ARCH_LIST"]


# accelerate's Accelerator sets ACCELERATE_USE_DEEPSPEED for the rest of the process once it is given a DeepSpeed
# plugin; a launcher (`accelerate launch --use_deepspeed`) sets it for the whole process: keep what the process began with
_LAUNCH_DEEPSPEED = os.environ.get("ACCELERATE_USE_DEEPSPEED")


def fresh_accelerator_state() -> None:
    """Forget accelerate's process-wide state (its ``AcceleratorState``, ``PartialState`` and ``GradientState``
    singletons) before a run builds its ``TrainingArguments``: otherwise, after a DeepSpeed run, every later run in
    the same process (a notebook's kernel, a test) kept DeepSpeed and that first run's config, whatever its own
    arguments said (seen 2026-12-07 on an H100: tests/test_zero3.py's plain DPO run trained under ZeRO-3 with the
    SFT runs' plugin), and, with the state reset alone, a default ZeRO-2 (the ``ACCELERATE_USE_DEEPSPEED`` that
    accelerate leaves set: back to what the process began with); transformers' ZeRO-3 flag is cleared too (a plain
    run's ``from_pretrained`` after a ZeRO-3 run made empty, partitioned weights), and so are the launcher variables
    :func:`launcher_env` set for an earlier run (a plain run after a DeepSpeed run trained as a distributed world of
    one: accelerate's ``MULTI_CPU``, ``MULTI_GPU`` on a GPU, seen 2026-12-07); a real launcher's stay.
    torch.distributed's process group stays. Call it before :func:`launcher_env`.

    Usage: ``fresh_accelerator_state(); launcher_env(ds_cfg)  # then TrainingArguments(...)``"""
    from accelerate.state import AcceleratorState, GradientState

    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    AcceleratorState._reset_state(reset_partial_state=True)  # (what accelerate's and transformers' tests call)
    GradientState._reset_state()
    unset_hf_deepspeed_config()  # else from_pretrained still partitions a plain run's model for ZeRO-3 (empty weights)
    if _LAUNCH_DEEPSPEED is None:
        os.environ.pop("ACCELERATE_USE_DEEPSPEED", None)
    else:
        os.environ["ACCELERATE_USE_DEEPSPEED"] = _LAUNCH_DEEPSPEED
    for k, v in _LAUNCHER_SET.items():
        if os.environ.get(k) == v:
            del os.environ[k]
    _LAUNCHER_SET.clear()
    gc.collect()  # an earlier run's released engines (release_deepspeed), held in reference cycles, go now
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def prepare_run(ds_cfg: str | None) -> None:
    """What every training run does before it builds its ``TrainingArguments``, in the order it needs:
    :func:`fresh_accelerator_state` (nothing of an earlier run in this process), :func:`launcher_env` (DeepSpeed in
    a notebook: a world of one) and :func:`deepspeed_arch_list` (a Hopper image's ``9.0a``).

    Usage: ``prepare_run(deepspeed_config(cfg.deepspeed))  # then TrainingArguments(...)``"""
    fresh_accelerator_state()
    launcher_env(ds_cfg)
    deepspeed_arch_list(ds_cfg)


def accelerate_setup(trainer) -> dict[str, Any]:
    """What the run's Trainer actually trained under, for its ``train_log.json``: accelerate's distributed type,
    the number of processes and, under DeepSpeed, the ZeRO stage and where optimizer and parameters were offloaded.

    Usage: ``save_trained(..., accelerate=accelerate_setup(trainer))``"""
    acc = trainer.accelerator
    out: dict[str, Any] = {"distributed_type": str(getattr(acc.distributed_type, "value", acc.distributed_type)),
                           "num_processes": acc.num_processes, "deepspeed": None}
    plugin = acc.state.deepspeed_plugin if getattr(trainer, "is_deepspeed_enabled", False) else None
    if plugin is not None:
        zero = plugin.deepspeed_config.get("zero_optimization", {})
        out["deepspeed"] = {"zero_stage": zero.get("stage"),
                            "offload_optimizer": zero.get("offload_optimizer", {}).get("device", "none"),
                            "offload_param": zero.get("offload_param", {}).get("device", "none")}
    return out


def checkpointing_args(enabled: bool) -> dict[str, Any]:
    """``TrainingArguments`` keywords for activation (gradient) checkpointing, non-reentrant. transformers
    5.2x renamed ``gradient_checkpointing[_kwargs]`` to ``activation_checkpointing[_kwargs]`` and warns
    (FutureWarning, in every training cell) when the old names are passed; older 5.x know only the old ones."""
    from transformers import TrainingArguments

    new = "activation_checkpointing" in {f.name for f in dataclasses.fields(TrainingArguments)}
    name = "activation_checkpointing" if new else "gradient_checkpointing"
    return {name: enabled, f"{name}_kwargs": {"use_reentrant": False} if enabled else None}


def pick_liger(setting: bool | str, cuda: bool, ds_cfg: str | None, compiled: bool = False) -> bool:
    """Resolve ``sft.liger_kernel`` (see :class:`lwlib.sft.SFTConfig`) for this machine, DeepSpeed config and
    ``sft.torch_compile``."""
    zero3 = bool(ds_cfg) and json.loads(Path(ds_cfg).read_text()).get("zero_optimization", {}).get("stage") == 3
    if setting == "auto":
        return cuda and not zero3 and not compiled and importlib.util.find_spec("liger_kernel") is not None
    if setting and compiled:
        raise ValueError("sft.liger_kernel: true does not work with sft.torch_compile: true (Liger's kernels fail "
                         "under torch.compile's dynamic shapes; the compiled model fuses the same operations itself)")
    if setting and zero3:
        raise ValueError(f"sft.liger_kernel does not work with ZeRO-3 ({ds_cfg}): the fused loss reads the output "
                         "head's weight, which ZeRO-3 partitions; use sft.loss_chunk_size instead")
    if setting and not cuda:
        raise RuntimeError("sft.liger_kernel: true needs CUDA (Liger-Kernel's kernels are Triton GPU kernels)")
    return bool(setting)


# the fp32 logits of one micro-batch above which sft.liger_kernel: auto never builds them (see pick_loss)
FULL_LOGITS_LIMIT_BYTES = 16 * 2**30


def full_logits_bytes(vocab: int, packing_length: int, per_device_batch: int) -> int:
    """The fp32 logits of one micro-batch of full packs: ``4 x vocab x packing_length x per_device_batch`` bytes
    (SmolLM2: 49,152 x 8,192 x 8 packs = 12.9 GB; Gemma 3: 262,144 x 32,768 = 34.4 GB per pack)."""
    return 4 * vocab * packing_length * per_device_batch


def auto_chunk_size(vocab: int) -> int:
    """Positions per chunk of :func:`lwlib.losses.chunked_sft_loss` whose fp32 logits take at most 1 GiB: a power
    of two, 256 at least (Gemma 3's 262,144 tokens: 1,024; a 49,152 vocabulary: 4,096)."""
    n = 256
    while 2 * n * vocab * 4 <= 2**30:
        n *= 2
    return n


def pick_loss(setting: bool | str, liger: bool, chunk_size: int, vocab: int, packing_length: int,
              per_device_batch: int, cuda: bool, ds_cfg: str | None = None) -> tuple[bool, int]:
    """The loss kernel of a run: ``(fused, chunk)``, Liger's fused linear cross-entropy when ``fused``
    (:func:`lwlib.losses.liger_sft_loss`), else the chunked head when ``chunk`` > 0, else the full logits.

    ``liger`` is :func:`pick_liger`'s answer for ``setting`` (``sft.liger_kernel``): on, the fused loss. Else a set
    ``chunk_size`` (``sft.loss_chunk_size``) is kept. Else, with ``setting`` ``auto``, when the fp32 logits of one
    micro-batch (:func:`full_logits_bytes`) exceed :data:`FULL_LOGITS_LIMIT_BYTES` (16 GiB: a 32k pack of Gemma 3's
    262k vocabulary is 34 GB; SmolLM2's 8 x 8k packs, 12.9 GB, keep the compiled full-logits loss that fits and was
    fastest there): the fused loss alone where it runs (CUDA, liger-kernel installed, no ZeRO-3: the case of
    ``sft.torch_compile``, where the model stays unpatched and the loss runs outside the compiled graph), else the
    chunked head at :func:`auto_chunk_size`. ``setting`` false with no chunk size keeps the full logits, as asked.

    Usage: ``fused, chunk = pick_loss(cfg.liger_kernel, liger, cfg.loss_chunk_size, model.config.vocab_size, ...)``
    """
    if liger:
        return True, 0
    if chunk_size:
        return False, chunk_size
    if setting != "auto" or full_logits_bytes(vocab, packing_length, per_device_batch) <= FULL_LOGITS_LIMIT_BYTES:
        return False, 0
    zero3 = bool(ds_cfg) and json.loads(Path(ds_cfg).read_text()).get("zero_optimization", {}).get("stage") == 3
    if cuda and not zero3 and importlib.util.find_spec("liger_kernel") is not None:
        return True, 0
    return False, auto_chunk_size(vocab)


def liger_kernels_for(model) -> dict[str, bool]:
    """Which of Liger-Kernel's kernels :func:`use_liger` patches into ``model``: the choice of its family,
    :func:`lwlib.families.liger_kernels`."""
    from .families import liger_kernels

    return liger_kernels(model.config)


def use_liger(model) -> None:
    """Patch Liger-Kernel's fused kernels (:func:`liger_kernels_for`: RMSNorm and SwiGLU, or Gemma's RMSNorm and
    GeGLU) into this model instance (the loss is separate: :func:`lwlib.losses.liger_sft_loss`). Liger also swaps
    the classes in the model's transformers module, which would turn every model created later in the process into
    a patched one; those module globals are put back, so only ``model`` changes. RoPE stays transformers' (Liger
    patches it module-wide only). Raises if the package or CUDA is missing; warns when Liger has no kernels for the
    model's family (the fused loss still runs).

    Usage: ``use_liger(model)`` (before ``Trainer(model=model, ...)``)
    """
    if not torch.cuda.is_available():
        raise RuntimeError("sft.liger_kernel needs CUDA (Liger-Kernel's kernels are Triton GPU kernels)")
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError as e:
        raise RuntimeError("sft.liger_kernel: the liger-kernel package is not installed "
                           "(pip install -e .[gpu])") from e
    kinds = liger_kernels_for(model)
    module = importlib.import_module(type(model).__module__)
    saved = dict(vars(module))
    try:
        _apply_liger_kernel_to_instance(model=model, **kinds)
    finally:
        for name, value in saved.items():
            if getattr(module, name, None) is not value:
                setattr(module, name, value)
    if not any(m._get_name().startswith("Liger") for m in model.modules()):
        warnings.warn(f"sft.liger_kernel: Liger-Kernel has no kernels for model type {model.config.model_type!r}; "
                      "the model runs unpatched (the fused loss still applies)")


def save_trained(trainer, result, model, tok, out_dir: str | Path, chat_template: str | None = None,
                 **log: Any) -> Path:
    """End a training run: ``trainer.save_model(out_dir)`` (called on every rank, as DeepSpeed needs), then on the
    main process the model's config with the KV cache on again, the tokenizer padding on the left (for generation;
    given ``chat_template`` when it has none: a base model then generates in the format it was trained on) and
    ``train_log.json`` beside the folder: log history, metrics, global step and the ``log`` keywords.
    ``result`` is what ``trainer.train()`` returned. The run's ZeRO-3 flag in transformers ends with it: a model
    loaded after the run in the same process (the notebook's kernel, a test) is whole, not partitioned for a
    DeepSpeed engine that no longer exists. Returns ``out_dir``."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    out_dir = Path(out_dir)
    trainer.save_model(str(out_dir))
    if trainer.is_world_process_zero():
        _write_generation_files(out_dir, model.config, tok, chat_template,
                                {"log_history": trainer.state.log_history, "metrics": result.metrics,
                                 "global_step": result.global_step, **log})
    unset_hf_deepspeed_config()  # (held while the Trainer's arguments live, which a caller may keep)
    release_deepspeed(trainer)
    return out_dir


def release_deepspeed(trainer) -> int:
    """Let a finished DeepSpeed run's engines go: each engine (the trained model's; TRL's ZeRO-3 reference model's)
    destroyed, its modules taken off DeepSpeed's process-wide ``FWD_MODULE_STACK``
    (``deepspeed.runtime.zero.parameter_offload``: ZeRO-3 puts the top module of every engine it builds there and
    never takes it off), and the ``functools.lru_cache`` on ``PartitionedParameterCoordinator.__params_to_release``
    emptied (a cache on a method: it keeps every coordinator and submodule it saw). Through the modules' hooks these
    two references kept the engine, its optimizer with the offloaded fp32 weights and Adam states, and the Trainer
    alive for the life of the process (DeepSpeed 0.19.8; ``engine.destroy()`` alone frees neither): each ZeRO-3
    offload run of SmolLM2-135M left 3.8 GB behind in the notebook's kernel (the rehearsal's main run and two caps:
    6.8, 10.6, 14.4 GB, H100, 2026-12-07; on the CPU the same 3.8 GB a run); ``lwlib.train sft --caps`` trains five
    runs in one process per rank. Nothing happens without DeepSpeed. :func:`save_trained` calls it; the memory is
    returned once the caller drops the Trainer (:func:`fresh_accelerator_state`, at the next run's start, collects
    it). Returns the number of engines released.

    Usage: ``release_deepspeed(trainer)  # after the model is saved``"""
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return 0
    from deepspeed import DeepSpeedEngine
    from deepspeed.runtime.zero import parameter_offload
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    engines = []
    for obj in (getattr(trainer, "model_wrapped", None), getattr(trainer, "deepspeed", None),
                getattr(trainer, "ref_model", None)):
        if isinstance(obj, DeepSpeedEngine) and all(obj is not e for e in engines):
            engines.append(obj)
    for engine in engines:
        ours = {id(m) for m in engine.module.modules()}
        parameter_offload.FWD_MODULE_STACK[:] = [m for m in parameter_offload.FWD_MODULE_STACK if id(m) not in ours]
        engine.destroy()
    if engines:
        _clear_method_caches(PartitionedParameterCoordinator)
    return len(engines)


def _clear_method_caches(cls: type) -> None:
    """Empty every ``functools.lru_cache`` among ``cls``'s methods, also one wrapped in another decorator (found in its
    closure): a cache on a method keeps each ``self`` it saw, and each argument, for the life of the process."""
    for f in vars(cls).values():
        inner = []
        for cell in getattr(f, "__closure__", None) or ():
            try:
                inner.append(cell.cell_contents)
            except ValueError:  # an empty cell
                pass
        for c in (f, *inner):
            if callable(getattr(c, "cache_clear", None)):
                c.cache_clear()


def _write_generation_files(out_dir: Path, config, tok, chat_template: str | None, train_log: dict[str, Any]) -> None:
    """Beside a run's saved weights: the config with the KV cache on, the tokenizer padding on the left (with
    ``chat_template`` where it has none; else it keeps the model's own) and, last, ``train_log.json``."""
    config.use_cache = True
    config.save_pretrained(out_dir)
    tok.padding_side = "left"
    if chat_template and not tok.chat_template:
        tok.chat_template = chat_template
    tok.save_pretrained(out_dir)
    atomic_write_json(out_dir.parent / "train_log.json", train_log)


def holds_last_step(ckpt: str | Path) -> bool:
    """Whether the Trainer's checkpoint folder ``ckpt`` holds its run's last step (``trainer_state.json``:
    ``global_step >= max_steps``: the process was stopped after saving it, before the final model was written).
    transformers' Trainer, resumed from such a checkpoint, trains one step past ``max_steps`` (it checks the limit
    after a step; seen with transformers 5.23, plain and ZeRO-3): :func:`finish_from_checkpoint` ends the run from it
    instead.

    Usage: ``if last and holds_last_step(last): finish_from_checkpoint(last, tok, out_dir)``"""
    state = Path(ckpt) / "trainer_state.json"
    if not state.exists():
        return False
    s = json.loads(state.read_text())
    return bool(s.get("max_steps")) and s["global_step"] >= s["max_steps"]


def finish_from_checkpoint(ckpt: str | Path, tok, out_dir: str | Path, chat_template: str | None = None,
                           **log: Any) -> Path:
    """End a training run from its final checkpoint (:func:`holds_last_step`) without training: the checkpoint's
    weight files (the Trainer writes them as ``save_model`` does; DeepSpeed ZeRO-3 gathered,
    ``stage3_gather_16bit_weights_on_model_save``) copied, the config with the KV cache on and the tokenizer as
    :func:`save_trained` writes them, ``train_log.json`` from the checkpoint's ``trainer_state.json`` (log history
    and global step; ``finished_from`` names the checkpoint; no step times). Written by rank 0 (``$RANK``), the
    config and ``train_log.json`` last, so a copy cut off is done again. Returns ``out_dir``."""
    import shutil

    from transformers import AutoConfig

    ckpt, out_dir = Path(ckpt), Path(out_dir)
    if int(os.environ.get("RANK", "0")) != 0:  # a launcher's other ranks: rank 0 writes the files
        return out_dir
    state = json.loads((ckpt / "trainer_state.json").read_text())
    weights = [f for f in ckpt.iterdir() if f.name.endswith((".safetensors", ".safetensors.index.json"))
               or f.name in ("generation_config.json", "training_args.bin")]
    if not any(f.suffix == ".safetensors" for f in weights):
        raise FileNotFoundError(f"{ckpt} holds no model weights (*.safetensors): train the run again "
                                f"(delete {ckpt.parent})")
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in weights:  # the files the Trainer wrote, as save_model writes them (byte for byte: same fingerprint)
        shutil.copyfile(f, out_dir / f.name)
    _write_generation_files(out_dir, AutoConfig.from_pretrained(ckpt), tok, chat_template,
                            {"log_history": state["log_history"], "metrics": None, "global_step": state["global_step"],
                             "finished_from": ckpt.name, **log})
    return out_dir


def peak_memory() -> dict[str, int | None]:
    """Peak memory: ``gpu_allocated_bytes`` / ``gpu_reserved_bytes`` (torch's peaks on the current CUDA device since
    the last reset, which :func:`step_timer` makes when training begins; None without CUDA) and ``cpu_max_rss_bytes``
    (this process's largest resident set over its whole life: pinned offload buffers included, and in a notebook's
    kernel also the stages before).

    Usage: ``peak_memory()["cpu_max_rss_bytes"]``"""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    cuda = torch.cuda.is_available()
    return {"gpu_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            "gpu_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None, "cpu_max_rss_bytes": rss}


def step_timer(out: str | Path | None = None) -> Any:
    """A ``transformers.TrainerCallback`` recording the wall time of every optimizer step (``.seconds``, for
    ``save_trained(..., step_seconds=timer.seconds)``: warm-up steps against the steady ones) and, at the end of
    training, the run's :func:`peak_memory` (``.peak_memory``, for ``save_trained(..., peak_memory=...)``). With
    ``$LWLIB_TRAIN_PROFILE=first:last`` (1-based steps, e.g. ``11:13``) and ``out`` (a folder) it also runs
    torch's profiler over those steps and writes ``out/train_profile.json``: wall time, summed GPU kernel time (their
    difference: the GPU idle), the CUDA kernels with the most GPU time and the CPU operators with the most self time.

    Usage: ``timer = step_timer(run); trainer.add_callback(timer)``
    """
    import time

    from transformers import TrainerCallback

    spec = os.environ.get("LWLIB_TRAIN_PROFILE", "")
    first, last = (int(x) for x in spec.split(":")) if spec and out is not None else (0, -1)

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.peak_memory: dict[str, int | None] = {}
            self.t0 = 0.0
            self.prof = None
            self.p0 = 0.0

        def on_step_begin(self, args, state, control, **kw):
            if state.global_step + 1 == first and state.is_world_process_zero:
                from torch.profiler import ProfilerActivity, profile

                torch.cuda.synchronize() if torch.cuda.is_available() else None
                self.prof = profile(activities=[ProfilerActivity.CPU]
                                    + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else []))
                self.prof.__enter__()
                self.p0 = time.perf_counter()

        def on_train_begin(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()  # this run's peak, not an earlier stage's in the same kernel
            self.t0 = time.perf_counter()

        def on_train_end(self, args, state, control, **kw):
            self.peak_memory = peak_memory()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            self.seconds.append(round(now - self.t0, 4))
            self.t0 = now
            if self.prof is not None and state.global_step == last:
                torch.cuda.synchronize() if torch.cuda.is_available() else None
                wall = time.perf_counter() - self.p0
                self.prof.__exit__(None, None, None)
                atomic_write_json(Path(out) / "train_profile.json", profile_summary(self.prof, wall, last - first + 1))
                self.prof = None
                self.t0 = time.perf_counter()  # (the profiler's own cost is not the next step's)

    return StepTimer()


def profile_summary(prof, wall_s: float, steps: int, k: int = 15, group=None) -> dict[str, Any]:
    """What :func:`step_timer` writes from a finished ``torch.profiler.profile``: per step, the wall time, the summed
    time of the GPU kernels, the ``k`` kernels with the most GPU time and the ``k`` CPU operators with the most self
    time (ms); with ``group`` (a kernel name -> its kind), every kernel's time summed by kind too."""
    gpu = lambda e: getattr(e, "self_device_time_total", 0) or getattr(e, "self_cuda_time_total", 0)  # noqa: E731
    ev = prof.key_averages()
    kern = sorted((e for e in ev if gpu(e) > 0 and str(getattr(e, "device_type", "")).endswith("CUDA")), key=gpu,
                  reverse=True)
    cpu = sorted(ev, key=lambda e: e.self_cpu_time_total, reverse=True)
    per = lambda us: round(us / 1000 / steps, 2)  # noqa: E731
    kinds: dict[str, float] = {}
    for e in kern if group else ():
        kinds[group(e.key)] = kinds.get(group(e.key), 0.0) + gpu(e)
    return {"steps": steps, "wall_ms_per_step": round(1000 * wall_s / steps, 1),
            "gpu_kernels_ms_per_step": per(sum(gpu(e) for e in kern)),
            **({"groups_ms_per_step": {g: per(v) for g, v in sorted(kinds.items(), key=lambda x: -x[1])}}
               if group else {}),
            "top_kernels": [{"kernel": e.key[:100], "ms_per_step": per(gpu(e)), "calls": e.count} for e in kern[:k]],
            "top_cpu_ops": [{"op": e.key[:100], "self_ms_per_step": per(e.self_cpu_time_total), "calls": e.count}
                            for e in cpu[:k]]}


# Largest relative difference |a - b| / |b| of the logged loss at any step for which two runs on the same data, seed
# and packs count as the same training, by the precision both train in. Fixed before any GPU comparison was run
# (2026-12-06) and not to be widened to make one pass.
# - fp32 (CPU): only the order of reductions differs (ZeRO-3's flattened partitions, its gradient-norm sum), ~1e-6
#   per step; 1e-4 leaves room for that to grow over tens of steps and still fails on any real difference (a lost
#   accumulation micro-step, a loss scaled by the accumulation steps twice or not at all moves it by 10% or more).
# - bf16 (GPU): DeepSpeed's bf16 runs the forward pass in bf16 weights (fp32 master copy in the optimizer) where the
#   plain run autocasts fp32 weights; bf16 keeps 8 bits of mantissa (relative 2^-8 = 0.4% per rounding), so the
#   first step's losses differ by up to about 1% and the runs drift apart slowly after it: 3% at any of the first 20
#   steps. A doubled or halved loss scale, a skipped micro-batch or a wrong learning-rate schedule is far outside it.
LOSS_RTOL = {"fp32": 1e-4, "bf16": 3e-2}


def compare_losses(a: str | Path | list[dict], b: str | Path | list[dict], precision: str) -> dict[str, Any]:
    """Two training runs' loss curves, step by step: ``a`` and ``b`` are run folders holding ``train_log.json`` (or
    their ``log_history`` lists); ``b`` is the reference (the plain single-process run). Every step logged in
    either must be logged in both. Returns ``steps``, ``max_rel_diff`` and ``at_step`` (the worst step),
    ``rtol`` (:data:`LOSS_RTOL` for ``precision``), ``per_step`` (step, loss a, loss b) and ``same`` (the largest
    relative difference is within ``rtol``).

    Usage: ``compare_losses(run / "sft_zero3", run / "sft_plain", "bf16")["same"]``"""
    from .runs import read_log_history

    if precision not in LOSS_RTOL:
        raise ValueError(f"precision {precision!r}: one of {sorted(LOSS_RTOL)}")
    curves = []
    for run in (a, b):
        hist = run if isinstance(run, list) else read_log_history(run, "lwlib.sft.train_sft or lwlib.dpo.train_dpo")
        curves.append({int(h["step"]): float(h["loss"]) for h in hist if "loss" in h and "step" in h})
    if not curves[1]:
        raise ValueError(f"no loss logged in {b}")
    if set(curves[0]) != set(curves[1]):
        raise ValueError(f"the runs log different steps: {sorted(curves[0])} in {a}, {sorted(curves[1])} in {b}")
    per = [(s, curves[0][s], curves[1][s]) for s in sorted(curves[1])]
    rel = [abs(x - y) / max(abs(y), 1e-12) for _, x, y in per]
    k = max(range(len(rel)), key=rel.__getitem__)
    return {"steps": len(per), "max_rel_diff": rel[k], "at_step": per[k][0], "rtol": LOSS_RTOL[precision],
            "precision": precision, "per_step": per, "same": rel[k] <= LOSS_RTOL[precision]}
