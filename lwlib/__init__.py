"""lwlib: a runnable reproduction of LongWriter (Bai et al., 2024, arXiv 2408.07055).

Stages follow the paper: ``probe`` (LongWrite-Ruler), ``agentwrite`` (long-output SFT data),
``sft`` (packed SFT with token-averaged loss), ``dpo``, ``nll`` (NLL by position) and ``bench``
(LongBench-Write). Shared pieces: ``text`` (word counting, repetition), ``models``, ``backends``,
``runs`` (run folders, resumable JSONL, atomic files), ``config`` (profiles), ``data`` (benchmark files, the
``hf:`` data set spec), ``scoring`` (the length score and buckets) and ``judge`` (the LLM judge the benchmark and
DPO share, so that neither stage imports the other); for training, ``packing`` (targets, packs),
``attention`` (kernels for flattened packs), ``losses`` (the SFT loss) and ``training`` (what SFT and DPO share).
"""

__version__ = "0.1.0"
