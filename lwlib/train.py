"""Command-line training entry point, for multi-GPU launchers (notebooks cannot start ranks).

``sft`` runs :func:`lwlib.sft.train_sft` (and, with ``--caps``, the controlled-experiment runs);
``dpo`` runs :func:`lwlib.dpo.train_dpo` on the pairs notebook 04 built (``runs/<profile>/dpo/pairs.jsonl``:
build them first, generation is not distributed). Every rank runs the same command; the Trainer
takes the DeepSpeed config named by the profile (``sft.deepspeed`` / ``dpo.deepspeed``). (The training helpers
the two stages share are :mod:`lwlib.training`; this module is only the command line.)

Usage::

    python -m lwlib.train sft --profile smoke --set sft.max_steps=2
    torchrun --nproc_per_node 8 -m lwlib.train sft --profile paper
    accelerate launch --num_processes 8 -m lwlib.train dpo --profile paper
"""

from __future__ import annotations

import argparse


def parse_sets(items: list[str]) -> dict:
    """``["sft.max_steps=2", "sft.caps=[500, 1000]"]`` -> overrides (values parsed as YAML); the parser of
    :func:`lwlib.config.parse_sets`, a malformed item exiting with its message."""
    from .config import ConfigError
    from .config import parse_sets as _parse

    try:
        return _parse(items)
    except ConfigError as e:
        raise SystemExit(str(e)) from None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m lwlib.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=["sft", "dpo"])
    ap.add_argument("--profile", default="smoke", help="smoke | gpu | paper | path to a YAML profile")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="override, e.g. sft.max_steps=10")
    ap.add_argument("--run-root", default=None)
    ap.add_argument("--caps", action="store_true", help="sft: also train the length-capped models (sft.caps)")
    args = ap.parse_args(argv)

    from .config import load_profile, set_labels

    prof = load_profile(args.profile, parse_sets(args.sets), args.run_root, override_labels=set_labels(args.sets))
    if args.stage == "sft":
        from .sft import SFTConfig, train_capped, train_sft

        cfg = prof.section("sft", SFTConfig)
        print("SFT model:", train_sft(prof, cfg))
        if args.caps:
            for cap in cfg.caps:
                print(f"SFT model capped at {cap} words:", train_capped(prof, cap, cfg))
    else:
        from .dpo import DPOStageConfig, load_pairs, train_dpo

        cfg = prof.section("dpo", DPOStageConfig)
        print("DPO model:", train_dpo(prof, cfg, pairs=load_pairs(prof)))


if __name__ == "__main__":
    main()
