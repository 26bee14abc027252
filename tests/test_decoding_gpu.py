"""The slots engine on CUDA: decoding steps captured as CUDA graphs give the tokens of eager steps (bf16) and of
plain ``generate`` (fp32, greedy; the Triton decoding attention and sdpa), with refills, compactions and
cache-bucket changes; seeded sampling repeats;
many rows in few slots all come back within their limits. ``./test.sh gpu``."""

import warnings

import pytest
import torch
from conftest import MODEL
from test_decoding import CASES, LIMITS, PROMPTS, SLOTS, fields

from lwlib.backends import GenParams, LocalBackend
from lwlib.data import load_ruler
from lwlib.models import load_model

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def fp32():
    return load_model(MODEL, device="cuda", dtype="float32")


@pytest.fixture(scope="module")
def bf16():
    return load_model(MODEL, device="cuda", dtype="bfloat16")


def _no_capture_warning(run):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = run()
    bad = [str(w.message) for w in seen if "capture failed" in str(w.message)]
    assert not bad, bad
    return out


def test_graphs_equal_plain_generate_fp32(fp32):
    model, tok = fp32
    p = GenParams(temperature=0)
    want = LocalBackend(model, tok, batch_size=1, name="m").generate(PROMPTS, p, max_new_tokens=LIMITS)
    slots = LocalBackend(model, tok, name="m", **SLOTS)
    got = _no_capture_warning(lambda: slots.generate(PROMPTS, p, max_new_tokens=LIMITS))
    assert [fields(g) for g in got] == [fields(g) for g in want]
    st = slots.slot_engine.stats
    assert st.captures >= 3 and st.compactions >= 1 and {(4, 56), (1, 80)} <= st.shapes
    assert slots.slot_engine.attention == "triton"  # auto on CUDA: the length-exact kernel (lwlib.decode_attention)
    # Liger's kernels: patches the model's RMSNorm/SwiGLU (the rows below compare engines on the patched model)
    liger = LocalBackend(model, tok, name="m", fused_kernels="liger", **SLOTS)
    assert liger.slot_engine.fused == "liger"
    assert [fields(g) for g in _no_capture_warning(lambda: liger.generate(PROMPTS, p, max_new_tokens=LIMITS))] == \
        [fields(g) for g in want]
    sdpa = LocalBackend(model, tok, name="m", attention="sdpa", **SLOTS)
    assert [fields(g) for g in _no_capture_warning(lambda: sdpa.generate(PROMPTS, p, max_new_tokens=LIMITS))] == \
        [fields(g) for g in want]
    # real prompts, longer outputs, one batch of plain generate as the reference
    ruler = [it.prompt for it in load_ruler()][:8]
    p = GenParams(max_new_tokens=96, temperature=0)
    want = LocalBackend(model, tok, batch_size=8, name="m").generate(ruler, p)
    got = LocalBackend(model, tok, name="m", engine="slots", max_batch=8).generate(ruler, p)
    assert sum(fields(a) == fields(b) for a, b in zip(got, want)) >= 7  # fp32 kernels may differ in the last bit


def test_graphs_equal_eager_steps_bf16(bf16):
    model, tok = bf16
    ruler = [it.prompt for it in load_ruler()][:24]
    limits = [16 + 13 * (i % 7) for i in range(len(ruler))]
    p = GenParams(temperature=0, repetition_penalty=1.2, repetition_window=32)
    kw = {"name": "m", "engine": "slots", "max_batch": 16, "segment_tokens": 8}
    graphs = LocalBackend(model, tok, **kw)
    got = _no_capture_warning(lambda: graphs.generate(ruler, p, max_new_tokens=limits))
    eager = LocalBackend(model, tok, cuda_graphs=False, **kw).generate(ruler, p, max_new_tokens=limits)
    assert [fields(g) for g in got] == [fields(g) for g in eager]
    assert graphs.slot_engine.stats.captures > 0
    assert all(g.completion_tokens <= m for g, m in zip(got, limits))


def test_sampling_seeded_and_many_rows(bf16):
    model, tok = bf16
    be = LocalBackend(model, tok, name="m", engine="slots", max_batch=32, segment_tokens=16)
    prompts = [c[0] for c in CASES] * 20
    limits = [8 + (i * 37) % 120 for i in range(len(prompts))]
    p = GenParams(temperature=0.8, top_p=0.95, seed=3)
    a = _no_capture_warning(lambda: be.generate(prompts, p, max_new_tokens=limits))
    b = be.generate(prompts, p, max_new_tokens=limits)
    assert [g.text for g in a] == [g.text for g in b]
    assert all(0 < g.completion_tokens <= m for g, m in zip(a, limits))
    assert all(g.completion_tokens == m for g, m in zip(a, limits) if g.finish_reason == "length")
