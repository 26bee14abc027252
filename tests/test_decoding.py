"""The slots engine and the generated-text repetition penalty (lwlib.decoding): buckets, the penalty against a
plain-Python reference and against transformers' processors, sampling, and greedy identity of the slots
engine with plain ``generate`` on the real bundled model (fp32, CPU), rows crossing segments, cache buckets,
refills and compactions."""

from __future__ import annotations

import math

import pytest
import torch

from lwlib.backends import (
    BackendConfig,
    GenParams,
    LocalBackend,
    compile_cache_dir,
    make_backend,
)
from lwlib.decoding import (
    SlotConfig,
    SlotEngine,
    batch_buckets,
    cache_buckets,
    kv_bytes_per_token,
    pick_bucket,
    pow2_buckets,
    round_up,
)
from lwlib.sampling import GenerationPenalty, sample_next, sample_rows, top_p_filter

# (prompt, max_new_tokens), in 4 slots: the first four (longest first) fill the slots, the last two refill the
# slots that the 6-token row and the stopping row free; the story (slot 1) runs longest, so the batch shrinks and
# it is moved down to slot 0; its cache (37 + 24 tokens) outgrows the 56-token bucket
CASES = [
    ("Write a long story about a dragon who learns to code in Python, with many details.", 6),  # 48 tokens
    ("Write a story about a dragon.", 24),  # 37 tokens, runs to its limit, last
    ("What is the capital of France?", 20),  # stops after 8
    ("Write a haiku about rain.", 10),
    ("Name three colors.", 16),  # refill; stops after 12
    ("Say hi.", 5),  # refill; hits its limit
]
PROMPTS = [p for p, _ in CASES]
LIMITS = [m for _, m in CASES]
GREEDY: dict[str, str] = {}
SLOTS = {"engine": "slots", "max_batch": 4, "segment_tokens": 4, "batch_buckets": [1, 2], "cache_buckets": [40, 56, 80]}


def fields(g):
    return (g.text, g.prompt_tokens, g.completion_tokens, g.finish_reason)


# -- buckets ---------------------------------------------------------------------------------------------


def test_bucket_selection():
    assert pow2_buckets(8, 192) == [8, 16, 32, 64, 128, 192]
    assert pow2_buckets(8, 256) == [8, 16, 32, 64, 128, 256]
    assert batch_buckets(256) == [8, 16, 32, 64, 128, 256]
    assert batch_buckets(4) == [4]
    assert batch_buckets(6, [1, 2, 4, 8]) == [1, 2, 4, 6]
    assert cache_buckets(8192) == [512, 1024, 2048, 4096, 8192]
    assert cache_buckets(8192, [1024, 2048, 16384]) == [1024, 2048, 8192]  # capped at the context
    assert cache_buckets(3000) == [512, 1024, 2048, 3000]
    assert [pick_bucket([8, 16, 64], n) for n in (1, 8, 9, 17, 64)] == [8, 8, 16, 64, 64]
    with pytest.raises(ValueError, match="exceeds the largest bucket 64"):
        pick_bucket([8, 16, 64], 65)
    assert [round_up(n, 64) for n in (1, 64, 65, 130)] == [64, 64, 128, 192]
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        batch_buckets(0)


def test_kv_size_and_slot_plan(model_and_tok):
    model, _ = model_and_tok
    assert kv_bytes_per_token(model.config, torch.bfloat16) == 2 * 30 * 3 * 64 * 2 == 23040
    assert kv_bytes_per_token(model.config, torch.float32) == 46080
    eng = SlotEngine(model, [2], 2, SlotConfig(max_batch=64, kv_cache_gb=1.0))
    # 1 GB holds 21 rows of 1024 fp32 tokens (47.2 MB each): 64 slots lowered to 21 (the largest bucket)
    with pytest.warns(UserWarning, match="max_batch 64 lowered to 21"):
        assert eng.plan(20, 1000) == (21, 1024)
    assert eng.plan(3, 1000) == (8, 1024)  # the batch bucket of the row count
    assert eng.plan(500, 300) == (42, 512)  # 42 rows of 512 tokens fit
    assert eng.plan(30, 5000) == (2, 8192)  # 8192 x 46 KB = 377 MB a row
    with pytest.raises(ValueError, match="KV budget"):
        SlotEngine(model, [2], 2, SlotConfig(kv_cache_gb=0.1)).plan(1, 8000)


# -- the penalty -----------------------------------------------------------------------------------------


def reference_penalty(scores, generated, penalty, window, ngram, end_ids):
    """Plain Python: the rule as documented, one row and one token at a time."""
    out = [list(r) for r in scores]
    for b, toks in enumerate(generated):
        recent = toks[-window:] if window else toks
        for t in set(recent):
            if t not in end_ids:
                x = out[b][t]
                out[b][t] = x * penalty if x < 0 else x / penalty
        if ngram and len(toks) >= ngram:
            prefix = toks[len(toks) - (ngram - 1):] if ngram > 1 else []
            for s in range(len(toks) - ngram + 1):
                if toks[s:s + ngram - 1] == prefix and toks[s + ngram - 1] not in end_ids:
                    out[b][toks[s + ngram - 1]] = -math.inf
    return out


@pytest.mark.parametrize("penalty,window,ngram", [(1.5, 0, 0), (1.5, 3, 0), (1.0, 0, 2), (2.0, 4, 3), (1.3, 2, 1)])
def test_penalty_matches_plain_python_reference(penalty, window, ngram):
    g = torch.Generator().manual_seed(0)
    V, end = 12, [2]
    scores = torch.randn(4, V, generator=g) * 3
    scores[0, 5] = 0.0
    rows = [[5, 7, 5, 2, 7, 5, 7], [1, 1, 1, 1], [3, 4, 3, 4, 3], []]  # ragged: counts 7, 4, 5, 0
    counts = torch.tensor([len(r) for r in rows])
    padded = torch.tensor([r + [9] * (7 - len(r)) for r in rows])  # 9 in the padding must not count
    got = GenerationPenalty(penalty, window, ngram, end).apply(scores, padded, counts)
    want = torch.tensor(reference_penalty(scores.tolist(), rows, penalty, window, ngram, end), dtype=torch.float32)
    torch.testing.assert_close(got, want)
    assert got[3].equal(scores[3])  # nothing generated: untouched
    assert got[0, 2] == scores[0, 2]  # the end token is never penalized
    if ngram == 0:
        assert got[:, 9].equal(scores[:, 9])  # padding beyond the counts is ignored


def test_penalty_equals_transformers_processors_on_generated_text():
    """Without end tokens in the text and with no window, the rule is transformers' own repetition penalty and
    no-repeat-n-gram ban applied to the generated ids alone (the prompt left out)."""
    from transformers import (
        NoRepeatNGramLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
    )

    g = torch.Generator().manual_seed(1)
    gen = torch.randint(3, 40, (3, 25), generator=g)
    gen[:, 10:14] = gen[:, 0:4]  # repeated n-grams
    scores = torch.randn(3, 40, generator=g)
    ours = GenerationPenalty(1.4, end_ids=[2]).apply(scores, gen)
    torch.testing.assert_close(ours, RepetitionPenaltyLogitsProcessor(1.4)(gen, scores.clone()))
    ours = GenerationPenalty(no_repeat_ngram_size=3, end_ids=[2]).apply(scores, gen)
    assert torch.equal(ours, NoRepeatNGramLogitsProcessor(3)(gen, scores.clone()))
    # as a processor for generate: the prompt (the first 6 ids) is left out
    prompt = torch.full((3, 6), 7)
    proc = GenerationPenalty(1.4, end_ids=[2]).for_generate(6)
    torch.testing.assert_close(proc(torch.cat([prompt, gen], 1), scores),
                               GenerationPenalty(1.4, end_ids=[2]).apply(scores, gen))
    assert torch.equal(proc(prompt, scores), scores)


def test_penalty_and_params_validation():
    with pytest.raises(ValueError, match="repetition_penalty must be > 0"):
        GenParams(repetition_penalty=0)
    with pytest.raises(ValueError, match="repetition_window must be >= 0"):
        GenParams(repetition_window=-1)
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        GenerationPenalty(no_repeat_ngram_size=-2)
    assert not GenerationPenalty().active and GenerationPenalty(1.1).active and GenerationPenalty(no_repeat_ngram_size=2).active


def test_sampling():
    from transformers import TopPLogitsWarper

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 30, generator=g)
    assert torch.equal(sample_next(scores, 0.0), scores.argmax(-1))
    assert torch.equal(top_p_filter(scores, 0.7), TopPLogitsWarper(0.7)(None, scores))
    a = sample_next(scores, 0.8, 0.9, torch.Generator().manual_seed(3))
    b = sample_next(scores, 0.8, 0.9, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    kept = top_p_filter(scores / 0.8, 0.9) > float("-inf")
    assert bool(kept[torch.arange(5), a].all())  # draws stay inside the nucleus
    assert torch.equal(sample_next(scores, 1.0, 1e-9, g), scores.argmax(-1))  # a tiny nucleus is the argmax


def test_per_row_penalty_and_temperature_equal_one_setting_per_row():
    """Rows of several decodings in one batch: each row is processed exactly as its own setting would."""
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(4, 20, generator=g) * 2
    toks = torch.randint(3, 20, (4, 9), generator=g)
    counts = torch.tensor([9, 6, 0, 9])
    pen, win = torch.tensor([1.0, 1.5, 1.3, 1.15]), torch.tensor([0, 3, 2, 4])
    got = GenerationPenalty(end_ids=[2]).apply(scores, toks, counts, pen, win)
    for b in range(4):
        one = GenerationPenalty(float(pen[b]), int(win[b]), end_ids=[2]).apply(scores[b:b + 1], toks[b:b + 1],
                                                                              counts[b:b + 1])
        assert torch.equal(got[b], one[0]), b
    assert torch.equal(got[0], scores[0])  # penalty 1.0: untouched
    # per-row temperature: greedy rows take the argmax, sampled rows stay inside their own distribution
    temps = torch.tensor([0.0, 0.5, 0.0, 2.0])
    draws = torch.stack([sample_rows(scores, temps, 1.0, torch.Generator().manual_seed(k)) for k in range(200)])
    assert torch.equal(draws[:, 0], scores[0].argmax().repeat(200)) and torch.equal(draws[:, 2], scores[2].argmax().repeat(200))
    hot, cold = (len(set(draws[:, 3].tolist())), len(set(draws[:, 1].tolist())))
    assert hot > cold  # temperature 2 spreads wider than 0.5


# -- the engine on the real model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engines(model_and_tok):
    model, tok = model_and_tok
    one_by_one = LocalBackend(model, tok, batch_size=1, name="m")  # plain model.generate, one prompt at a time
    batched = LocalBackend(model, tok, batch_size=6, name="m")
    slots = LocalBackend(model, tok, name="m", **SLOTS)
    return one_by_one, batched, slots


def test_slots_greedy_equals_plain_generate(engines):
    one_by_one, _, slots = engines
    p = GenParams(temperature=0)
    want = one_by_one.generate(PROMPTS, p, max_new_tokens=LIMITS)
    st = slots.slot_engine.stats
    before = (st.prefill_calls, st.compactions, st.prefill_rows)
    order, got = [], {}
    for i, g in slots.generate_iter(PROMPTS, p, max_new_tokens=LIMITS):
        order.append(i)
        got[i] = g
    assert [fields(got[i]) for i in range(len(PROMPTS))] == [fields(g) for g in want]
    # the cases do what they are meant to: early stops, per-row limits, a row past several segments
    assert [g.finish_reason for g in want] == ["length", "length", "stop", "length", "stop", "length"]
    assert [g.completion_tokens for g in want] == [6, 24, 8, 10, 12, 5]
    # results come as rows finish: the France answer (8 tokens) before the 24-token story, which comes last
    assert order.index(2) < order.index(1) and order[-1] == 1
    # 6 prompts in 4 slots: refills; the story moved down as the batch shrank; the cache bucket grew 56 -> 80
    assert st.prefill_calls - before[0] >= 2 and st.prefill_rows - before[2] == 6
    assert st.compactions - before[1] >= 1
    assert {(4, 56), (1, 80)} <= st.shapes
    GREEDY["story"] = got[1].text  # spares the penalty test a run
    assert all(g.latency_s > 0 for g in got.values())


def test_slots_with_penalty_equal_generate_engine(engines):
    _, batched, slots = engines
    p = GenParams(temperature=0, repetition_penalty=1.3, repetition_window=16)
    want = batched.generate(PROMPTS, p, max_new_tokens=LIMITS)
    got = slots.generate(PROMPTS, p, max_new_tokens=LIMITS)
    assert [fields(g) for g in got] == [fields(g) for g in want]
    plain = GREEDY.get("story") or slots.generate(
        PROMPTS[1:2], GenParams(temperature=0), max_new_tokens=LIMITS[1:2])[0].text
    assert plain != got[1].text  # the penalty changed the story


def test_rows_of_two_decodings_in_one_call_equal_separate_calls(engines):
    """Greedy rows with and without the penalty in one slots-engine batch give exactly the outputs of one call
    per decoding (and of the generate engine, which runs the groups one after another)."""
    _, batched, slots = engines
    plain, pen = GenParams(temperature=0), GenParams(temperature=0, repetition_penalty=1.3, repetition_window=16)
    want = (slots.generate(PROMPTS, plain, max_new_tokens=LIMITS)
            + slots.generate(PROMPTS, pen, max_new_tokens=LIMITS))
    mixed = [plain] * len(PROMPTS) + [pen] * len(PROMPTS)
    got = slots.generate(PROMPTS + PROMPTS, mixed, max_new_tokens=LIMITS + LIMITS)
    assert [fields(g) for g in got] == [fields(g) for g in want]
    assert got[1].text != got[len(PROMPTS) + 1].text  # the penalty changed the story: the rows did differ
    assert [fields(g) for g in batched.generate(PROMPTS + PROMPTS, mixed, max_new_tokens=LIMITS + LIMITS)] == \
        [fields(g) for g in want]
    with pytest.raises(ValueError, match="sampling settings"):
        slots.generate(PROMPTS, [plain])


def test_slots_sampling_seeded_and_ignore_eos(engines):
    _, _, slots = engines
    p = GenParams(max_new_tokens=5, temperature=0.9, top_p=0.95, seed=7)
    a = slots.generate(PROMPTS[:2], p)
    b = slots.generate(PROMPTS[:2], p)
    assert [g.text for g in a] == [g.text for g in b]
    # the France answer stops after 8 tokens (above); ignore_eos runs it to its limit
    forced = slots.generate([PROMPTS[2]], GenParams(max_new_tokens=10, temperature=0, ignore_eos=True))[0]
    assert (forced.completion_tokens, forced.finish_reason) == (10, "length")


def test_decode_time_excludes_graph_capture(model_and_tok, monkeypatch):
    """``stats.decode_s`` (the benchmarks' ms per step) does not count CUDA-graph capture, which has its own
    ``capture_s``: a capture during which the clock jumps 1,000 s is not in decode_s (no wall-clock bound: the
    clock is moved, not waited on, so a loaded machine passes too)."""
    import time

    model, tok = model_and_tok
    be = LocalBackend(model, tok, name="m", engine="slots", max_batch=2, segment_tokens=4)
    eng, st = be.slot_engine, be.slot_engine.stats
    plain, real, jump = eng._decode, time.perf_counter, [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: real() + jump[0])

    def capturing(b, length):  # what _capture does to the clock and the stats, once per shape
        if (b, length) not in eng._graphs:
            eng._graphs[(b, length)] = None
            jump[0] += 1000.0
            st.capture_s += 1000.0
        return plain(b, length)

    monkeypatch.setattr(eng, "_decode", capturing)
    t0 = time.perf_counter()
    be.generate(PROMPTS[:2], GenParams(temperature=0, ignore_eos=True), max_new_tokens=[6, 6])
    wall = time.perf_counter() - t0
    assert st.capture_s == pytest.approx(1000.0 * len(eng._graphs)) and wall > st.capture_s
    assert 0 < st.decode_s < 1000.0


def test_slots_errors_and_config(model_and_tok):
    model, tok = model_and_tok
    be = LocalBackend(model, tok, name="m", engine="slots")
    with pytest.raises(ValueError, match="max_new_tokens of prompt 1 is 0"):
        be.generate(["a", "b"], GenParams(), max_new_tokens=[3, 0])
    with pytest.raises(ValueError, match="context is 8192"):
        be.generate(["word " * 9000], GenParams(max_new_tokens=4))
    with pytest.raises(ValueError, match="engine must be one of"):
        BackendConfig(engine="vllm")
    with pytest.raises(ValueError, match="engine must be one of"):
        LocalBackend(model, tok, engine="fast")
    cfg = BackendConfig(engine="slots", segment_tokens=5, max_batch=16, cache_buckets=[256], kv_cache_gb=2.0)
    be = make_backend(cfg, "smollm2-135m-instruct", device="cpu", dtype="float32")
    c = be.slot_engine.cfg
    assert (be.engine, c.segment_tokens, c.max_batch, c.cache_buckets, c.kv_cache_gb) == ("slots", 5, 16, [256], 2.0)
    assert be.slot_engine.cache_buckets == [256, 8192]
    assert LocalBackend(model, tok).slot_engine is None  # engine "generate" by default
    with pytest.raises(ValueError, match="fused_kernels must be one of"):
        SlotConfig(fused_kernels="yes")
    assert SlotEngine(model, [2], 2).fused == "none"  # auto: Liger only on CUDA
    with pytest.raises(ValueError, match="fused_kernels 'liger'"):  # the package missing, or no CUDA: said, not skipped
        SlotEngine(model, [2], 2, SlotConfig(fused_kernels="liger"))


def test_compile_cache_dir(monkeypatch, tmp_path):
    import json

    from lwlib.runs import compile_caches, write_manifest

    for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):  # (set first, so monkeypatch restores them)
        monkeypatch.setenv(var, "x")
        monkeypatch.delenv(var)
    monkeypatch.setenv("LWLIB_CACHE", str(tmp_path))
    assert compile_cache_dir() == str(tmp_path / "inductor")
    assert compile_caches() == {"inductor": str(tmp_path / "inductor"), "triton": str(tmp_path / "triton")}
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/elsewhere")
    assert compile_cache_dir() == "/elsewhere"
    man = json.loads(write_manifest(tmp_path, {"a": 1}).read_text())
    assert man["compile_caches"] == {"inductor": "/elsewhere", "triton": str(tmp_path / "triton")}
