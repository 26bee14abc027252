"""The slots engine's Triton decoding attention (lwlib.decode_attention) against plain torch: every row's own
length (0, split and block boundaries, the last column), grouped-query heads, fp32 and bf16 storage; then in the
engine on the real model, greedy outputs equal to plain ``generate`` (fp32). On CPU the kernels run in Triton's
interpreter (tests/conftest.py sets ``TRITON_INTERPRET=1``); on CUDA compiled (``./test.sh gpu``)."""

from __future__ import annotations

import pytest
import torch
from test_decoding import CASES, SLOTS, fields

from lwlib import decode_attention as da
from lwlib.backends import GenParams, LocalBackend
from lwlib.decoding import SlotConfig, SlotEngine

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not da.available(DEV), reason="needs Triton (installed by env/setup.sh)")


@pytest.mark.parametrize("heads,kvh", [(9, 3), (4, 4), (8, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_equals_reference(heads, kvh, dtype):
    g = torch.Generator().manual_seed(heads * 10 + kvh)
    slots, length, d = 7, 600, 64
    k = torch.randn(slots, kvh, length, d, generator=g).to(dtype).to(DEV)
    v = torch.randn(slots, kvh, length, d, generator=g).to(dtype).to(DEV)
    q = torch.randn(6, heads, d, generator=g).to(dtype).to(DEV)
    # one column; a block boundary; the last column of the first split; the first of the second; deep; the last
    lens = torch.tensor([0, 63, da.SPLIT - 1, da.SPLIT, 450, length - 1], device=DEV)
    got = da.decode_attention(q, k, v, lens, 0.125)
    want = da.decode_attention_reference(q, k, v, lens, 0.125)
    assert got.shape == q.shape and got.dtype == dtype
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    # a column past a row's length does not matter; a column within it does
    k2 = k.clone()
    k2[0, :, 1:] = 1e4
    torch.testing.assert_close(da.decode_attention(q, k2, v, lens, 0.125)[0].float(), got[0].float())
    k2[5, :, 0] = 1e4
    assert not torch.allclose(da.decode_attention(q, k2, v, lens, 0.125)[5].float(), got[5].float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemma3_head_shape_equals_reference(dtype):
    """Gemma-3-270M's heads (4 query heads on 1 key/value head of 256): fp32 keys of 1,024 bytes take blocks of 32
    (64 asked an H200 for more shared memory than it has, and the engine fell back to sdpa), bf16 blocks of 64."""
    assert (da.block_keys(256, 4), da.block_keys(256, 2), da.block_keys(64, 4), da.block_keys(1024, 4)) == (
        32, da.BLOCK, da.BLOCK, 16)
    g = torch.Generator().manual_seed(3)
    k, v = (torch.randn(3, 1, 300, 256, generator=g).to(dtype).to(DEV) for _ in range(2))
    q = torch.randn(3, 4, 256, generator=g).to(dtype).to(DEV)
    lens = torch.tensor([31, 32, 299], device=DEV)  # the end of a 32-key block, the next block's first key, deep
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(da.decode_attention(q, k, v, lens, 0.0625).float(),
                               da.decode_attention_reference(q, k, v, lens, 0.0625).float(), atol=tol, rtol=tol)


def test_grid_of_a_longer_bucket_gives_the_same_output():
    """The grid is sized by ``length`` (a CUDA graph's cache bucket); splits past a row's length do nothing."""
    g = torch.Generator().manual_seed(1)
    k, v = (torch.randn(3, 3, 1024, 64, generator=g).to(DEV) for _ in range(2))
    q = torch.randn(3, 9, 64, generator=g).to(DEV)
    lens = torch.tensor([5, 300, 511], device=DEV)
    a = da.decode_attention(q, k, v, lens, 0.125, length=512)
    b = da.decode_attention(q, k, v, lens, 0.125, length=1024)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    # the tuning settings (benchmarks/generation.py --attention-sweep) change the split, not the result
    tuned = da.decode_attention(q, k, v, lens, 0.125, length=512, split=128, block=16, num_warps=4, num_stages=2)
    torch.testing.assert_close(tuned, a, atol=1e-5, rtol=1e-5)


def test_kernel_input_errors():
    q = torch.zeros(2, 9, 64, device=DEV)
    k = torch.zeros(2, 3, 64, 64, device=DEV)
    with pytest.raises(ValueError, match="does not fit the cache"):
        da.decode_attention(torch.zeros(2, 8, 64, device=DEV), k, k, torch.zeros(2, dtype=torch.long, device=DEV), 1.0)
    with pytest.raises(ValueError, match="does not fit the cache"):
        da.decode_attention(torch.zeros(3, 9, 64, device=DEV), k, k, torch.zeros(3, dtype=torch.long, device=DEV), 1.0)
    for split, block in ((256, 48), (100, 64), (256, 8)):
        with pytest.raises(ValueError, match="power of two >= 16 dividing split"):
            da.decode_attention(q, k, k, torch.zeros(2, dtype=torch.long, device=DEV), 1.0, split=split, block=block)
    with pytest.raises(ValueError, match="contiguous"):
        da.decode_attention(q, k.transpose(2, 3), k.transpose(2, 3), torch.zeros(2, dtype=torch.long, device=DEV), 1.0)


@pytest.fixture(scope="module")
def dev_model(model_and_tok):
    """The bundled model (fp32) on the device the kernel runs on (a copy on CUDA)."""
    import copy

    model, tok = model_and_tok
    return (model if DEV == "cpu" else copy.deepcopy(model).to(DEV)), tok


def test_engine_picks_and_validates_attention(dev_model, monkeypatch):
    model, tok = dev_model
    with pytest.raises(ValueError, match="attention must be one of"):
        SlotConfig(attention="flash")
    assert SlotEngine(model, [2], 2, SlotConfig(attention="auto")).attention == ("triton" if DEV == "cuda" else "sdpa")
    assert SlotEngine(model, [2], 2, SlotConfig(attention="triton")).attention == "triton"  # CPU: the interpreter
    assert da.self_check(DEV, torch.float32, 9, 3, 64) is None
    assert "power of two" in da.self_check(DEV, torch.float32, 10, 2, 80)
    if DEV == "cpu":  # without the interpreter the kernel cannot run on CPU: a clear error, never a silent switch
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(ValueError, match="attention 'triton' cannot run here: Triton needs a CUDA device"):
            SlotEngine(model, [2], 2, SlotConfig(attention="triton"))


def _greedy_equal(dev_model, cases):
    model, tok = dev_model
    prompts, limits = [p for p, _ in cases], [m for _, m in cases]
    p = GenParams(temperature=0)
    want = LocalBackend(model, tok, batch_size=1, name="m").generate(prompts, p, max_new_tokens=limits)
    be = LocalBackend(model, tok, name="m", attention="triton", **SLOTS)
    got = be.generate(prompts, p, max_new_tokens=limits)
    assert be.slot_engine.attention == "triton"
    assert [fields(g) for g in got] == [fields(g) for g in want]
    return be.slot_engine.stats


def test_engine_with_kernel_equals_plain_generate(dev_model):
    """Two rows that stop at different steps (one at an end token), across a segment boundary."""
    st = _greedy_equal(dev_model, [CASES[2][:1] + (10,), CASES[5]])
    assert st.steps > SLOTS["segment_tokens"]


@pytest.mark.slow
def test_engine_with_kernel_equals_plain_generate_all_cases(dev_model):
    """The cases of test_decoding (refills, a compaction, the cache bucket growing 56 -> 80): ~1 minute in the
    interpreter."""
    st = _greedy_equal(dev_model, CASES)
    assert st.compactions >= 1 and {(4, 56), (1, 80)} <= st.shapes
