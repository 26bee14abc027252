"""The slots engine on sliding-window models (Gemma 3's hybrid attention): a tiny random Gemma 3 whose window (8
tokens) is shorter than the prompts and the outputs, so the local layers' ring buffers wrap in prefill and in
decoding. Greedy fp32 output must equal transformers' ``generate`` (its sliding-window cache) token for token,
with refills, a compaction, rows of two decodings in one batch and the Triton decoding kernel (Triton's
interpreter on CPU). The architecture rules themselves (lwlib.families) are checked on configs."""

from __future__ import annotations

import pytest
import torch

from lwlib import decode_attention as da
from lwlib.backends import GenParams
from lwlib.decoding import SlotConfig, SlotEngine, kv_bytes_per_token, row_cache_bytes
from lwlib.families import GENERIC, family, layer_windows, unsupported
from lwlib.sampling import GenerationPenalty

WINDOW = 8
END = 1  # Gemma's <eos> id; the random model rarely picks it, so rows run to their limits
# (prompt length, max_new_tokens): prompts up to 21 tokens (> the window: the prefill keeps each row's last 8 keys),
# outputs up to 30 tokens (the ring wraps several times); 6 prompts in 4 slots: refills, then a compaction
CASES = [(21, 6), (12, 30), (3, 17), (9, 11), (5, 24), (16, 9)]


def tiny_gemma3(window: int = WINDOW, seed: int = 0):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=256, sliding_window=window,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=16, bos_token_id=2, eos_token_id=END, pad_token_id=0)
    torch.manual_seed(seed)
    model = Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # larger random weights: sharper, varied next-token choices (no near-ties in fp32)
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(4.0)
    return model


def prompts(seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[2] + torch.randint(3, 128, (n - 1,), generator=g).tolist() for n, _ in CASES]


def reference(model, ps, limits, penalty: GenerationPenalty | None = None) -> list[list[int]]:
    """transformers ``generate``, one prompt at a time (no padding), greedy, with the same penalty processor."""
    out = []
    for p, m in zip(ps, limits):
        ids = torch.tensor([p])
        procs = [penalty.for_generate(len(p))] if penalty is not None else None
        with torch.no_grad():
            g = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=m, do_sample=False,
                               eos_token_id=END, pad_token_id=0, logits_processor=procs)
        out.append(g[0, len(p):].tolist())
    return out


def run(eng, ps, limits, params) -> list[list[int]]:
    got = {i: toks for i, toks, _, _ in eng.run(ps, limits, params)}
    return [got[i] for i in range(len(ps))]


@pytest.fixture(scope="module")
def model():
    return tiny_gemma3()


SLOTS = SlotConfig(max_batch=4, segment_tokens=4, batch_buckets=[1, 2], cache_buckets=[24, 40, 64])


def test_windows_and_cache_size_from_the_config(model):
    assert family(model.config).name == "gemma3" and family(model.config).liger is False
    assert layer_windows(model.config) == [8, 8, None, 8]
    per_layer = 2 * 1 * 16 * 4  # k and v, one kv head of 16, fp32
    assert kv_bytes_per_token(model.config, torch.float32) == 4 * per_layer
    assert row_cache_bytes(model.config, torch.float32, 100) == (100 + 3 * 8) * per_layer
    assert row_cache_bytes(model.config, torch.float32, 5) == 4 * 5 * per_layer  # shorter than the window
    from transformers import AutoConfig, LlamaConfig, MistralConfig

    assert layer_windows(LlamaConfig(num_hidden_layers=3)) == [None] * 3 and family(LlamaConfig()).liger
    assert layer_windows(MistralConfig(num_hidden_layers=2, sliding_window=16)) == [16, 16]
    assert family(AutoConfig.for_model("gpt2")) is GENERIC
    assert unsupported(model.config) is None
    from transformers import Gemma2Config

    assert "final_logit_softcapping" in unsupported(Gemma2Config())
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        from transformers import Gemma2ForCausalLM

        SlotEngine(Gemma2ForCausalLM(Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                                 head_dim=16)), [1], 0)


def test_ring_buffers_hold_the_window_only(model):
    eng = SlotEngine(model, [END], 0, SLOTS)
    run(eng, prompts()[:2], [3, 3], GenParams(max_new_tokens=3, temperature=0))
    slots, length = eng._pool
    assert [k.shape[2] for k in eng.k] == [8, 8, length, 8] and all(k.shape[0] == slots for k in eng.k)


def test_greedy_equals_generate_with_wrapping_rings(model):
    ps, limits = prompts(), [m for _, m in CASES]
    want = reference(model, ps, limits)
    eng = SlotEngine(model, [END], 0, SLOTS)
    got = run(eng, ps, limits, GenParams(temperature=0))
    assert got == want
    assert [len(t) for t in got] == limits  # every row ran to its limit: its ring wrapped
    st = eng.stats
    assert st.prefill_rows == 6 and st.prefill_calls >= 2 and st.compactions >= 1  # refills and a compaction
    # the window matters here: the same weights attending over everything write other tokens
    full = tiny_gemma3(window=256)
    assert reference(full, ps, limits) != want


def test_rows_of_two_decodings_in_one_batch(model):
    """Greedy rows with and without the windowed penalty in one batch: each equals ``generate`` with its own
    processor."""
    ps, limits = prompts(2), [m for _, m in CASES]
    plain = GenParams(temperature=0)
    pen = GenParams(temperature=0, repetition_penalty=1.5, repetition_window=6)
    want = reference(model, ps, limits) + reference(model, ps, limits, GenerationPenalty(1.5, 6, end_ids=[END]))
    assert want[:6] != want[6:]  # the penalty changes the outputs
    got = run(SlotEngine(model, [END], 0, SLOTS), ps + ps, limits + limits, [plain] * 6 + [pen] * 6)
    assert got == want


def test_window_longer_than_the_cache(model):
    """A window wider than the call's cache: the rings are as long as the cache and never wrap."""
    wide = tiny_gemma3(window=200)
    ps, limits = prompts(3)[:3], [10, 10, 10]
    eng = SlotEngine(wide, [END], 0, SLOTS)
    assert run(eng, ps, limits, GenParams(temperature=0)) == reference(wide, ps, limits)
    assert [k.shape[2] for k in eng.k] == [eng._pool[1]] * 4


@pytest.mark.skipif(not da.available("cpu"), reason="needs Triton's interpreter (a CPU machine; on CUDA: the GPU test)")
def test_triton_kernel_on_rings_equals_generate(model):
    """The decoding kernel reads a ring (all its columns once the row is longer than the window)."""
    ps, limits = prompts(4)[:2], [14, 12]
    eng = SlotEngine(model, [END], 0, SlotConfig(max_batch=2, segment_tokens=4, cache_buckets=[64],
                                                 attention="triton"))
    assert eng.attention == "triton"
    assert run(eng, ps, limits, GenParams(temperature=0)) == reference(model, ps, limits)


def test_penalty_fast_path_equals_the_mask_rule():
    """The gather/scatter penalty equals the occurrence-mask rule, for penalties above and below 1, per-row
    windows with a look-back bound, repeated ids and end tokens."""
    g = torch.Generator().manual_seed(5)
    V = 50
    scores = torch.randn(5, V, generator=g) * 3
    toks = torch.randint(0, 12, (5, 20), generator=g)  # many repeats
    toks[:, 3] = END
    counts = torch.tensor([20, 13, 1, 0, 7])

    def mask_rule(p: float, w: int, b: int) -> torch.Tensor:
        n = int(counts[b])
        seen = set(toks[b, max(0, n - w) if w else 0:n].tolist()) - {END}
        out = scores[b].clone()
        for t in seen:
            out[t] = out[t] * p if out[t] < 0 else out[t] / p
        return out

    for p, w in [(1.3, 0), (1.3, 5), (0.7, 4), (2.0, 1)]:
        got = GenerationPenalty(p, w, end_ids=[END]).apply(scores, toks, counts)
        for b in range(5):
            assert torch.equal(got[b], mask_rule(p, w, b)), (p, w, b)
    pen, win = torch.tensor([1.3, 0.8, 1.0, 1.5, 1.2]), torch.tensor([5, 3, 9, 2, 6])
    got = GenerationPenalty(end_ids=[END]).apply(scores, toks, counts, pen, win, span=9)
    for b in range(5):
        assert torch.equal(got[b], mask_rule(float(pen[b]), int(win[b]), b)), b
