"""lwlib: a runnable reproduction of LongWriter (Bai et al., 2024, arXiv 2408.07055).

Stages follow the paper: ``probe`` (LongWrite-Ruler), ``agentwrite`` and ``corpus`` (long-output SFT data: AgentWrite
and the human-written stand-in), ``sft`` (packed SFT with token-averaged loss), ``dpo``, ``nll`` (NLL by position)
and ``bench`` (LongBench-Write); ``experiments`` and ``claims`` turn their files into the paper's claims, with
``intervals`` (censored quantiles, the seeds-and-prompts bootstrap), and ``claims_view`` shows them as one table
(notebook 06, the HTML report of ``report``). No stage imports another. Shared pieces:
``text`` (word counting, repetition), ``models`` (with the bundled models), ``families`` (what differs between
architectures: sliding windows, fused kernels), ``backends`` (with ``decoding``, the slots engine, ``sampling``, its
penalty and sampling, ``decode_attention``, its Triton attention kernel, ``decode_norm`` and ``decode_rope``, its
bit-exact norm and RoPE kernels, and ``served``, a server per model),
``decodings``, ``generation`` (generate into a store),
``runs`` (run folders, resumable JSONL, atomic files), ``config`` (profiles, with ``typed``, typed values), ``data`` (benchmark files, the ``hf:``
data set spec), ``scoring`` (the length score and buckets), ``judge`` (the LLM judge the benchmark and DPO share)
and ``logprobs`` (per-token log-likelihood, for NLL and DPO); for training, ``packing`` (targets, packs),
``attention`` (kernels for flattened packs), ``losses`` (the SFT loss) and ``training`` (what SFT and DPO share);
``plots`` (figures and their readability check).
"""

__version__ = "0.1.0"
