"""The benchmarks' own logic: ``benchmarks/sft_throughput.py``'s flex-attention BlockMask of packed sequences
equals the one torch builds from the mask function, token for token, its FLOP count follows each layer's real
attention span (Gemma-3-270M's shape counted by hand), and it runs a tiny random Gemma 3 end to end on CPU;
``benchmarks/generation.py`` runs end to end on CPU at tiny sizes and its table's ratios and KV-read floors follow
from its own counts."""

import importlib.util
import json

import pytest
import torch

from lwlib.runs import REPO_ROOT


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("sft_throughput", REPO_ROOT / "benchmarks" / "sft_throughput.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_document_block_mask_equals_torchs_block_mask(bench):
    from torch.nn.attention.flex_attention import create_block_mask

    rows = [[100, 28, 300, 76, 1, 1, 6], [512], [64] * 8, [129, 127, 256]]  # boundaries on and off block edges
    pos = torch.tensor([[p for n in lens for p in range(n)] for lens in rows])
    doc = (pos == 0).cumsum(-1)
    ref = create_block_mask(lambda b, h, q, kv: (doc[b, q] == doc[b, kv]) & (q >= kv), 4, None, 512, 512,
                            device="cpu", BLOCK_SIZE=64)
    got = bench.document_block_mask(pos, 64)
    assert torch.equal(got.kv_num_blocks, ref.kv_num_blocks)
    assert torch.equal(got.full_kv_num_blocks, ref.full_kv_num_blocks)
    for name, count in (("kv_indices", got.kv_num_blocks), ("full_kv_indices", got.full_kv_num_blocks)):
        for b in range(4):
            for q in range(8):
                k = int(count[b, 0, q])
                assert set(getattr(got, name)[b, 0, q, :k].tolist()) == set(getattr(ref, name)[b, 0, q, :k].tolist())
    assert torch.equal(got.to_dense(), ref.to_dense())
    # and the per-token mask function sees sequence boundaries: a token never attends across them
    assert not bool(got.mask_mod(torch.tensor(0), None, torch.tensor(100), torch.tensor(99)))
    assert bool(got.mask_mod(torch.tensor(0), None, torch.tensor(99), torch.tensor(0)))
    with pytest.raises(ValueError, match="multiple of the block size"):
        bench.document_block_mask(pos[:, :500], 64)


def test_flop_count_follows_each_layers_span(bench):
    """``model_flops``: 6 x the matmul weights (output layer included) per token, plus 12 x query width x the keys
    each query attends, summed per layer: p for full layers, min(p, window) for sliding ones. Gemma-3-270M's shape
    (built on the meta device: no weights) counted by hand."""
    from transformers import AutoModelForCausalLM

    for n in (1, 5, 8, 9, 40):
        for w in (None, 8):
            assert bench.attention_span(n, w) == sum(p if w is None else min(p, w) for p in range(1, n + 1))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(bench.model_config("gemma3-270m"))
    params, width, windows = bench.flop_shape(model)
    layer = 640 * 4 * 256 + 2 * 640 * 256 + 4 * 256 * 640 + 3 * 640 * 2048  # q, k, v, o; gate, up, down
    assert params == 18 * layer + 640 * 262_144 and width == 4 * 256
    assert windows == ([512] * 5 + [None]) * 3
    n = 32_768
    full, sliding = n * (n + 1) // 2, 512 * 513 // 2 + (n - 512) * 512
    assert bench.model_flops([n], params, width, windows) == 6 * n * params + 12 * width * (3 * full + 15 * sliding)
    assert bench.model_flops([n, 10], params, width, windows) == (bench.model_flops([n], params, width, windows)
                                                                 + bench.model_flops([10], params, width, windows))


def test_sft_benchmark_tiny_random_gemma3(bench, tmp_path):
    """``--model gemma3-270m --random-init`` with its config shrunk (``--config``) runs packed steps on CPU (one
    row per pack with sdpa; flattened with torch_varlen, the CPU reference of the windowed kernel), each row timed
    with its FLOP count; ``--kernels auto`` resolves to what train_sft picks (no Liger on CPU, small logits)."""
    out = tmp_path / "sft.json"
    info = bench.main(["--model", "gemma3-270m", "--random-init", "--config", "num_hidden_layers=2", "hidden_size=64",
                       "intermediate_size=128", "num_attention_heads=2", "head_dim=32", "query_pre_attn_scalar=32",
                       "sliding_window=16", "vocab_size=512", 'layer_types=["sliding_attention","full_attention"]',
                       "--pack", "96", "--rows", "2", "--examples", "10", "--settings", "packed",
                       "--attn", "sdpa", "torch_varlen", "--kernels", "none", "auto", "--steps", "1", "--warmup", "1",
                       "--peak-tflops", "1e-6", "--out", str(out)])
    rows = info["rows"]
    assert [r.get("error") for r in rows] == [None] * 4
    assert [(r["attn"], r["kernels"]) for r in rows] == [("sdpa", "none"), ("torch_varlen", "none"),
                                                         ("sdpa", "auto:none"), ("torch_varlen", "auto:none")]
    for r in rows:  # MFU = the step's FLOPs / its time / the peak (1 MFLOP/s here)
        assert r["tokens_per_s"] > 0 and r["model_gflop_per_step"] > 0
        assert r["mfu"] == pytest.approx(r["model_gflop_per_step"] * 1e9 / (r["step_ms"] / 1000) / 1e6, rel=0.01)
    assert json.loads(out.read_text())["args"]["random_init"] is True


@pytest.fixture(scope="module")
def gen_bench():
    import sys

    spec = importlib.util.spec_from_file_location("generation_bench", REPO_ROOT / "benchmarks" / "generation.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up there
    spec.loader.exec_module(mod)
    yield mod
    sys.modules.pop(spec.name, None)


def _check_generation_result(res, out):
    import json

    assert json.loads(out.read_text()) == json.loads(json.dumps(res))
    rows = res["rows"]
    assert {r["workload"] for r in rows} >= {"probe", "agentwrite", "dpo"} and any(r["workload"].startswith("decode-") for r in rows)
    for wl in {r["workload"] for r in rows}:
        mine = [r for r in rows if r["workload"] == wl]
        gen = [r for r in mine if r["engine"] == "generate"]
        assert len(gen) == 1 and gen[0]["capped"]
        ratio = [r for r in mine if r["x_generate"] is not None]  # the slots row at the generate row's cap
        assert len(ratio) == 1 and ratio[0]["max_new"] == gen[0]["max_new"] and ratio[0]["engine"] == "slots"
        assert ratio[0]["x_generate"] == round(ratio[0]["tokens_per_s"] / gen[0]["tokens_per_s"], 2)
        (cb,) = [r for r in mine if r["engine"] == "transformers_cb"]  # transformers' continuous batching, real limits
        slots_real = next(r for r in mine if r["engine"] == "slots" and not r["capped"])
        assert (cb["rows"], cb["max_new"], cb["capped"]) == (slots_real["rows"], slots_real["max_new"], False)
        assert cb["x_slots"] == round(cb["tokens_per_s"] / slots_real["tokens_per_s"], 2)
        assert 0 <= cb["capture_s"] <= cb["first_s"]  # its start-up counts in its wall time
        assert all(r["x_slots"] is None for r in mine if r is not cb)
        for r in mine:
            assert 0 < r["first_s"] <= r["wall_s"] and r["tokens"] > 0
            if r["engine"] == "slots":  # the floor: each layer's cached KV (a window's worth for a local layer) and the
                bw = res["bandwidth_B_per_s"]  # weights, read once per step, over the bandwidth
                kv_floor = r["kv_layer_tokens"] * res["layer_kv_bytes_per_token"] / bw / r["steps"] * 1000
                assert r["kv_floor_ms"] == pytest.approx(kv_floor, abs=1e-3) and r["kv_floor_ms"] <= r["bucket_floor_ms"]
                assert r["floor_ms"] == pytest.approx(kv_floor + res["weight_bytes"] / bw * 1000, abs=2e-3)
                assert r["kv_layer_tokens"] == 30 * r["context_tokens"]  # no sliding window: every layer, every token
                assert 0 < r["occupancy"] <= 1
    for r in rows:  # ignore_eos: every decode row makes exactly its tokens, on all three engines
        if r["workload"].startswith("decode-"):
            assert r["tokens"] == r["rows"] * r["max_new"] and r["stopped"] == 0
    assert res["layer_kv_bytes_per_token"] == 2 * 3 * 64 * 4  # one layer's key and value, fp32 on CPU
    assert res["weight_bytes"] > 0
    assert [c["slots_vs_generate"] == c["prompts"] for c in res["greedy_check"]] == [True]
    assert [c["transformers_cb_vs_generate"] == c["prompts"] for c in res["greedy_check"]] == [True]


@pytest.mark.slow  # 30 s on 2 cores: the benchmark script's table and floors (./test.sh slow)
def test_generation_benchmark_minimal(gen_bench, tmp_path, capsys):
    """The generation benchmark end to end at its smallest (every workload, the slots engine, plain generate and
    transformers' continuous batching, the greedy check)."""
    out = tmp_path / "gen.json"
    res = gen_bench.main(["--tiny", "--device", "cpu", "--decode-batches", "2", "--decode-tokens", "4",
                          "--probe-prompts", "2", "--probe-tokens", "6", "--aw-prompts", "2", "--aw-tokens", "6",
                          "--dpo-prompts", "1", "--dpo-long", "8", "--dpo-short", "2", "5", "--generate-tokens", "4",
                          "--check-prompts", "1", "--check-tokens", "6", "--transformers-cb", "--out", str(out)])
    assert res["out"] == str(out)
    _check_generation_result(res, out)
    printed = capsys.readouterr().out
    assert "| workload | engine | attention | fused | rows | batch |" in printed and "greedy identity (float32" in printed


@pytest.mark.slow  # the kernels' identity is tested in test_decode_attention.py; this is the benchmark's table
def test_generation_benchmark_attention_rows(gen_bench, tmp_path):
    """One slots row per attention kernel, no generate rows (``--generate-tokens 0``) and no transformers CB rows;
    the probe workload holds prompts x samples rows."""
    pytest.importorskip("triton")
    res = gen_bench.main(["--tiny", "--device", "cpu", "--attention", "sdpa", "triton", "--workloads", "decode", "probe",
                          "--decode-batches", "2", "--decode-context", "80", "--decode-tokens", "2", "--probe-prompts",
                          "2", "--probe-samples", "2", "--probe-tokens", "2", "--generate-tokens", "0", "--check-prompts", "0",
                          "--breakdown", "--attention-sweep", "--rerun-best", "--breakdown-steps", "1", "--out", str(tmp_path / "g.json")])
    got = [(r["workload"], r["engine"], r["attention"], r["fused"], r["rows"], r["capped"], r["x_generate"])
           for r in res["rows"]]
    assert got == [("decode-2", "slots", "sdpa", "none", 2, False, None), ("decode-2", "slots", "triton", "none", 2, False, None),
                   ("decode-2", "slots", "sdpa", "none", 2, False, None),  # --rerun-best: the first engine, tuned
                   ("probe", "slots", "sdpa", "none", 4, False, None), ("probe", "slots", "triton", "none", 4, False, None)]
    assert all(r["tokens"] == 4 for r in res["rows"][:3])  # ignore_eos: 2 rows x 2 tokens
    best = min(res["attention_sweeps"][0]["settings"][1:], key=lambda r: r["ms"])  # the sweep's faster setting
    assert res["rows"][2]["tuning"] == {k: best[k] for k in ("split", "block", "num_warps", "num_stages")}
    brk, tuned = res["breakdowns"]  # where a step goes: each part timed alone (no kernels on CPU); again tuned
    assert tuned["tuning"] == res["rows"][2]["tuning"] and set(tuned["ms"]) == set(brk["ms"])
    assert (brk["workload"], brk["rows"], brk["attention"]) == ("decode-2", 2, "sdpa") and 60 < brk["context"] < 120
    assert set(brk["ms"]) == {"forward", "forward_eager", "draw", "penalty"} and min(brk["ms"].values()) > 0
    assert brk["logits"][:2] == [2, 49152] and "kernels" not in brk
    (sweep,) = res["attention_sweeps"]  # the copy's rate, the kernel at its defaults, then the tiny grid's setting
    assert [r.get("block", "copy") for r in sweep["settings"]] == ["copy", None, 16]
    assert all(r["ms"] > 0 and r["GB_per_s"] >= 0 and "error" not in r for r in sweep["settings"])


def test_kernel_groups_of_real_kernel_names(gen_bench):
    """The breakdown's groups, on kernel names as the profiler reports them on an H100 (torch 2.11, cu130)."""
    names = {"_split_kernel": "attention (lwlib Triton)", "_merge_kernel": "attention (lwlib Triton)",
             "nvjet_tst_128x64_64x8_2x1_v_bz_TNN": "matmul",
             "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1": "matmul",
             "_rms_norm_forward_kernel": "Liger (RMSNorm, GeGLU/SwiGLU, RoPE)",
             "_geglu_tanh_forward_kernel": "Liger (RMSNorm, GeGLU/SwiGLU, RoPE)",
             "void at::native::(anonymous namespace)::cunn_SoftMaxForward<4, float, float, float, "
             "at::native::(anonymous namespace)::SoftMaxForwardEpilogue>(float*, float const*, int)":
                 "softmax, draw, argmax",
             "Memcpy DtoD (Device -> Device)": "copies",
             "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>, "
             "std::array<char*, 3ul> >(int, at::native::CUDAFunctor_add<float>, std::array<char*, 3ul>)": "other"}
    assert {n: gen_bench.kernel_group(n) for n in names} == names


def test_stage_benchmark_tiny(tmp_path):
    """benchmarks/stages.py runs the probe stage's own code in a fresh run folder and counts what it made."""
    spec = importlib.util.spec_from_file_location("stages_bench", REPO_ROOT / "benchmarks" / "stages.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["probe", "--tiny", "--probe-samples", "2", "--out", str(tmp_path / "s.json")])
    (row,) = res["rows"]
    # the smoke probe: 2 ruler prompts (en, lengths 1000/5000, 1 template) x 2 samples, 8 tokens each at most
    assert (row["stage"], row["outputs"], row["max_new_tokens"], row["met"]) == ("probe", 4, 8, None)
    assert 0 < row["tokens_out"] <= 4 * 8 and row["seconds"] > 0 and res["git_sha"]
    with pytest.raises(SystemExit):
        mod.main(["nope", "--tiny"])


@pytest.mark.slow
def test_generation_benchmark_tiny(gen_bench, tmp_path):
    out = tmp_path / "gen.json"
    _check_generation_result(gen_bench.main(["--tiny", "--device", "cpu", "--transformers-cb", "--out", str(out)]), out)


def test_profile_summary_sums_every_kernel_by_group(gen_bench):
    """lwlib.training.profile_summary on hand-made profiler events: per step, the top kernels and, with the
    breakdown's kernel_group, every kernel's time by group (the ones past the top too); CPU operators apart."""
    from types import SimpleNamespace as E

    from lwlib.training import profile_summary

    ev = [E(key="_split_kernel", self_device_time_total=4000.0, device_type="DeviceType.CUDA", count=6,
            self_cpu_time_total=0.0),
          E(key="nvjet_tst_128x64", self_device_time_total=1000.0, device_type="DeviceType.CUDA", count=40,
            self_cpu_time_total=0.0),
          E(key="_merge_kernel", self_device_time_total=500.0, device_type="DeviceType.CUDA", count=6,
            self_cpu_time_total=0.0),
          E(key="aten::mm", self_device_time_total=0.0, device_type="DeviceType.CPU", count=40,
            self_cpu_time_total=900.0)]
    prof = E(key_averages=lambda: ev)
    got = profile_summary(prof, wall_s=0.02, steps=2, k=1, group=gen_bench.kernel_group)
    assert got["wall_ms_per_step"] == 10.0 and got["gpu_kernels_ms_per_step"] == 2.75
    assert [t["kernel"] for t in got["top_kernels"]] == ["_split_kernel"]
    assert got["groups_ms_per_step"] == {"attention (lwlib Triton)": 2.25, "matmul": 0.5}
    assert "groups_ms_per_step" not in profile_summary(prof, 0.02, 2)
