"""Which loop-free decoding? A CPU trial of repetition-penalty settings on the bundled base model.

The paper's decoding (temperature 0.5) makes SmolLM2-135M loop to the token limit. This script samples a few
English LongWrite-Ruler prompts under the paper's decoding and under windowed repetition penalties (only generated
tokens, never the prompt or the end tokens: the rule of ``GenParams.repetition_window``) and prints, per output,
whether the model stopped, its words, effective words and whether it collapsed into repetition. The profiles'
``loopfree`` decoding was chosen from its output (``benchmarks/results/loopfree_decoding_cpu_trial.jsonl``).

Usage::

    python benchmarks/loopfree_trial.py --setting paper 1.0 0 --setting pen115w512 1.15 512 --max-new-tokens 1024
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    from lwlib.backends import GenParams, LocalBackend
    from lwlib.data import load_ruler
    from lwlib.text import repetition_report

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setting", nargs=3, action="append", metavar=("NAME", "PENALTY", "WINDOW"),
                    help="a decoding: name, repetition penalty (1.0 = off), window in generated tokens (0 = all)")
    ap.add_argument("--max-new-tokens", type=int, default=1024)
    ap.add_argument("--prompts", type=int, default=4, help="English ruler prompts of 2,000 and 5,000 words")
    ap.add_argument("--out", default=None, help="JSONL file for the records (default: print only)")
    args = ap.parse_args()
    settings = args.setting or [("paper", "1.0", "0"), ("pen115w512", "1.15", "512")]
    torch.set_num_threads(max(1, torch.get_num_threads()))
    items = [it for it in load_ruler() if it.lang == "en" and it.length in (2000, 5000)][: args.prompts]
    be = LocalBackend("smollm2-135m-instruct", batch_size=len(items), device="cpu", dtype="float32")
    out = open(args.out, "a", encoding="utf-8") if args.out else None
    for name, pen, win in settings:
        params = GenParams(args.max_new_tokens, temperature=0.5, repetition_penalty=float(pen),
                           repetition_window=int(win), seed=0)
        t0 = time.perf_counter()
        for i, g in be.generate_iter([it.prompt for it in items], params, desc=name):
            rep = repetition_report(g.text)
            rec = {"dec": name, "req": items[i].length, "stop": g.finish_reason == "stop", "words": rep.words,
                   "eff": rep.effective_words, "collapsed": rep.collapsed, "rate": round(rep.repeated_rate, 3),
                   "tail": g.text[-300:]}
            print(json.dumps({k: v for k, v in rec.items() if k != "tail"}))
            if out:
                out.write(json.dumps(rec, ensure_ascii=False) + "\n")
        print(f"{name}: {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
