"""SFT (paper Section 4.1): training template, assistant-only targets, packing, the token-mean loss,
a real CPU training run of the bundled model, the length cap, and the DeepSpeed configs."""

import copy
import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch

from lwlib.attention import FA4_ATTENTION, VARLEN_ATTENTION, flat_packs
from lwlib.config import load_profile
from lwlib.losses import sft_loss, trainer_class
from lwlib.packing import (IGNORE, PackCollator, PackedDataset, load_template, pack_examples, split_batch,
                           tokenize_chat, training_template)
from lwlib.plots import check_figure
from lwlib.runs import REPO_ROOT
from lwlib.sft import SFTConfig, apply_length_cap, load_sft_data, load_train_log, output_words, train_sft
from lwlib.training import pick_liger

CONVS = [
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}],
    [{"role": "user", "content": "Write two lines about rain."},
     {"role": "assistant", "content": "Rain taps the glass,\nand the street hums softly."},
     {"role": "user", "content": "Now one about sun."}, {"role": "assistant", "content": "Sun spills gold on roofs."}],
    [{"role": "user", "content": "Explain packing in one sentence."},
     {"role": "assistant", "content": "Packing puts several short conversations into one long row so no compute "
                                      "is wasted on padding, while attention stays inside each conversation."}],
]


@pytest.fixture(scope="module")
def tok(model_and_tok):
    return model_and_tok[1]


@pytest.fixture(scope="module")
def template(tok):
    return training_template(tok)


def test_training_template_renders_the_models_own_text(tok, template):
    assert template == load_template("smollm2_chatml")
    for conv in CONVS:
        assert tok.apply_chat_template(conv, tokenize=False) == tok.apply_chat_template(
            conv, chat_template=template, tokenize=False)
        prompt = conv[:-1]
        assert tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True) == tok.apply_chat_template(
            prompt, chat_template=template, tokenize=False, add_generation_prompt=True)


def test_targets_are_the_assistant_tokens_and_end_of_turn(tok, template):
    conv = CONVS[2]
    ex = tokenize_chat(tok, conv, template)
    targets = [x for x in ex.labels if x != IGNORE]
    want = tok(conv[1]["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"] + \
        tok(conv[3]["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
    assert targets == want
    # labels are pre-shifted: the target at position i is the token at i + 1
    for i, y in enumerate(ex.labels):
        if y != IGNORE:
            assert ex.input_ids[i + 1] == y
    assert ex.labels[-1] == IGNORE
    assert tok.decode(targets).count("<|im_end|>") == 2 and "user" not in tok.decode(targets)


def test_packing_keeps_every_example_including_the_last_partial_pack():
    lengths = [700, 600, 500, 400, 300, 200, 100, 90, 5]
    packs = pack_examples(lengths, max_tokens=1000, seed=0)
    flat = sorted(i for p in packs for i in p)
    assert flat == list(range(len(lengths)))  # each example exactly once, none dropped
    assert all(sum(lengths[i] for i in p) <= 1000 for p in packs)
    assert len(packs) == 3  # 2895 tokens need at least 3 packs of 1000; best-fit finds 3
    with pytest.raises(ValueError, match="example 1 has 1200 tokens"):
        pack_examples([10, 1200], max_tokens=1000)


def test_packed_logits_equal_logits_alone(model_and_tok, template):
    """A sequence inside a pack (position ids restarting, no attention mask) gets the logits it gets
    alone: sdpa's block-diagonal mask from the position ids. fp32 on CPU, tolerance 1e-4."""
    model, tok = model_and_tok
    exs = [tokenize_chat(tok, c, template) for c in CONVS]
    ds = PackedDataset(exs, [[0, 1, 2, 3]])
    for flatten in (False, True):
        batch = PackCollator(pad_id=tok.pad_token_id, flatten=flatten)([ds[0]])
        with torch.no_grad():
            packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
            start = 0
            for e in exs:
                alone = model(input_ids=torch.tensor([e.input_ids]), use_cache=False).logits[0]
                got = packed[start:start + len(e)]
                assert (got - alone).abs().max().item() < 1e-4
                start += len(e)
    # the flattened-pack attention paths (their CPU reference: per-sequence sdpa over the collator's boundaries)
    batch = PackCollator(pad_id=tok.pad_token_id, flatten=True)([ds[0]])
    assert batch["cu_seq_lens_q"].tolist() == [0, *itertools.accumulate(len(e) for e in exs)]
    assert batch["cu_seq_lens_q"].dtype == torch.int32 and batch["max_length_q"] == max(len(e) for e in exs)
    inputs, _ = split_batch(batch)
    assert set(inputs) == {"input_ids", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                           "max_length_k"}
    with torch.no_grad():
        ref = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
    for attn in (VARLEN_ATTENTION, FA4_ATTENTION):
        varlen = copy.deepcopy(model)
        varlen.set_attn_implementation(attn)
        with torch.no_grad():
            packed = varlen(**inputs, use_cache=False).logits[0]
        assert (packed - ref).abs().max().item() < 1e-4, attn
        with pytest.raises(ValueError, match="needs cu_seq_lens_q"):
            varlen(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    # without restarting position ids the second sequence would see the first: the test can fail
    batch = PackCollator(pad_id=tok.pad_token_id)([ds[0]])
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
        alone = model(input_ids=torch.tensor([exs[1].input_ids]), use_cache=False).logits[0]
    assert (leaky[len(exs[0]):len(exs[0]) + len(exs[1])] - alone).abs().max().item() > 1e-2


def test_padded_rows_with_pad_block_match_alone(model_and_tok, template):
    model, tok = model_and_tok
    exs = [tokenize_chat(tok, c, template) for c in CONVS[:2]]
    ds = PackedDataset(exs, [[0], [1]])
    batch = PackCollator(pad_id=tok.pad_token_id)([ds[0], ds[1]])
    assert batch["input_ids"].shape == (2, max(len(e) for e in exs))
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        for r, e in enumerate(exs):
            alone = model(input_ids=torch.tensor([e.input_ids]), use_cache=False).logits[0]
            assert (out[r, :len(e)] - alone).abs().max().item() < 1e-4


def _hand_batch():
    """Two micro-batches of a hand-built step: logits and pre-shifted labels with known token losses."""
    torch.manual_seed(0)
    V = 7
    lab1 = torch.tensor([[1, 2, IGNORE, 3, 4, 5, IGNORE]])       # seq A: 2 targets, seq B: 3 targets
    w1 = torch.tensor([[.5, .5, .5, 1 / 3, 1 / 3, 1 / 3, 1 / 3]])
    lab2 = torch.tensor([[6, IGNORE, IGNORE, IGNORE]])           # seq C: 1 target
    w2 = torch.tensor([[1., 1., 1., 1.]])
    lg1, lg2 = torch.randn(1, 7, V), torch.randn(1, 4, V)
    return (lg1, lab1, w1), (lg2, lab2, w2)


def test_token_mean_loss_over_the_whole_step():
    (lg1, lab1, w1), (lg2, lab2, w2) = _hand_batch()
    nll = lambda lg, y: -torch.log_softmax(lg, -1)[0, torch.arange(len(y[0])), y[0].clamp(min=0)]  # noqa: E731
    t1, t2 = nll(lg1, lab1), nll(lg2, lab2)
    tokens = [t1[0], t1[1], t1[3], t1[4], t1[5], t2[0]]
    direct = sum(tokens) / 6
    got = sft_loss(lg1, lab1, 6) + sft_loss(lg2, lab2, 6)  # each micro-batch divided by the step's 6 targets
    assert torch.allclose(got, direct, atol=1e-6)
    # the per-sequence ablation: mean over the 3 sequences of each sequence's mean
    seq = ((t1[0] + t1[1]) / 2 + (t1[3] + t1[4] + t1[5]) / 3 + t2[0]) / 3
    got_seq = sft_loss(lg1, lab1, 3, w1, "sequence") + sft_loss(lg2, lab2, 3, w2, "sequence")
    assert torch.allclose(got_seq, seq, atol=1e-6)
    assert not torch.allclose(direct, seq, atol=1e-3)  # the two weightings differ on this batch


def test_chunked_loss_equals_the_whole_pack_loss_and_gradients():
    """chunked_sft_loss(hidden, head) == sft_loss(head(hidden)) in value and in the gradients of the hidden
    states and the head, for chunk sizes that do and do not divide the length, with a chunk without targets."""
    from lwlib.losses import chunked_sft_loss

    torch.manual_seed(0)
    d, V, T = 16, 50, 23
    head = torch.nn.Linear(d, V, bias=False)
    hidden = torch.randn(1, T, d, requires_grad=True)
    labels = torch.randint(0, V, (1, T))
    labels[0, 4:13] = IGNORE  # chunk size 4: positions 4-7 and 8-11 have no target at all
    weights = torch.rand(1, T)
    for mode, w in (("token", None), ("sequence", weights)):
        want = sft_loss(head(hidden), labels, 11.0, w, mode)
        g_want = torch.autograd.grad(want, (hidden, head.weight))
        for chunk in (4, 5, 23, 64):
            got = chunked_sft_loss(hidden, head, labels, 11.0, w, mode, chunk)
            assert torch.allclose(got, want, atol=1e-6), (mode, chunk)
            for a, b in zip(torch.autograd.grad(got, (hidden, head.weight)), g_want):
                assert torch.allclose(a, b, atol=1e-6), (mode, chunk)
    none = torch.full((1, T), IGNORE)
    z = chunked_sft_loss(hidden, head, none, 1.0, chunk_size=4)
    assert float(z) == 0.0 and z.requires_grad  # still a graph: every rank runs its backward
    with pytest.raises(ValueError, match="loss_weights"):
        chunked_sft_loss(hidden, head, labels, 1.0, None, "sequence")


def test_fused_kernel_operands_follow_autocast_and_the_master_weight_gets_its_gradient():
    """lwlib.losses.autocast_operands: under autocast a fused kernel gets its dtype (Liger's fused linear
    cross-entropy multiplies with out= ops, which autocast does not cast: fp32 weights ran fp32 GEMMs), and the
    gradient reaches the fp32 weight; outside autocast nothing changes."""
    from lwlib.losses import autocast_operands

    h, w = torch.randn(6, 8), torch.randn(5, 8, requires_grad=True)
    assert autocast_operands(h, w) == (h, w, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h2, w2, accum = autocast_operands(h, w)
    assert (h2.dtype, w2.dtype, accum) == (torch.bfloat16, torch.bfloat16, torch.float32)
    (h2 @ w2.t()).float().sum().backward()
    assert w.grad is not None and w.grad.dtype == torch.float32
    torch.testing.assert_close(w.grad, h.sum(0).expand(5, 8), atol=0.1, rtol=0.02)


def test_trainer_loss_runs_under_the_trainings_autocast(model_and_tok, template, tmp_path, monkeypatch):
    """The Trainer autocasts only the model's forward (accelerate wraps it); the loss's own products (the fused or
    chunked output head) must run under that autocast too, else the output head ran in fp32 on the GPU (issue 28).
    bf16 mixed precision on the CPU (accelerate's native autocast there) stands in for the GPU's."""
    from transformers import TrainingArguments

    import lwlib.losses as losses

    model, tok = model_and_tok
    exs = [tokenize_chat(tok, c, template) for c in CONVS[:2]]
    coll = PackCollator(pad_id=tok.pad_token_id)
    batch = coll([PackedDataset(exs, [[0, 1]])[0]])
    seen, inner = [], losses.chunked_sft_loss

    def spy(hidden, head, *a, **k):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), head(hidden[:, :2]).dtype))
        return inner(hidden, head, *a, **k)

    monkeypatch.setattr(losses, "chunked_sft_loss", spy)
    # (bf16 training, loss_autocast): the third is sft.fp32_loss_head's, as runs before 2026-12-07 trained
    for bf16, loss_autocast in ((True, True), (False, True), (True, False)):
        args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=1, use_cpu=True, bf16=bf16,
                                 report_to=[])
        trainer = trainer_class()(model=copy.deepcopy(model), args=args, data_collator=coll, loss_chunk_size=7,
                                  loss_autocast=loss_autocast)
        _, denom = trainer.get_batch_samples(iter([batch]), 1, torch.device("cpu"))
        assert torch.isfinite(trainer.compute_loss(trainer.model, batch, num_items_in_batch=denom))
    assert seen == [(True, torch.bfloat16, torch.bfloat16), (False, torch.bfloat16, torch.float32),
                    (False, torch.bfloat16, torch.float32)], seen


def test_fp32_loss_head_names_runs_and_reaches_training(monkeypatch):
    """sft.fp32_loss_head: the named runs train with the loss outside the autocast, the others under it; a
    tag list of another type is refused."""
    import lwlib.sft as sft

    cfg = SFTConfig(caps=[500, 1000], seeds=2, fp32_loss_head=["sft", "cap500-s1"])
    got = []
    monkeypatch.setattr(sft, "train_sft", lambda prof, c, out_dir, seed, loss_autocast: got.append(loss_autocast))

    class Prof:
        run_dir = Path("/nonexistent")

    for run in sft.sft_runs(cfg):
        sft.train_run(Prof(), run)
    tags = [r.tag for r in sft.sft_runs(cfg)]
    assert dict(zip(tags, got)) == {"sft": False, "cap500": True, "cap1000": True, "sft-s1": True,
                                    "cap500-s1": False, "cap1000-s1": True}
    with pytest.raises(ValueError, match="sft.fp32_loss_head must be a list of run tags"):
        SFTConfig(fp32_loss_head="sft")


def test_collator_weights_and_counts(tok, template):
    exs = [tokenize_chat(tok, c, template) for c in CONVS[:3]]
    batch = PackCollator(pad_id=tok.pad_token_id)([PackedDataset(exs, [[0, 1, 2]])[0]])
    w, y = batch["loss_weights"][0], batch["labels"][0]
    assert batch["num_sequences"] == 3 and batch["num_targets"] == int((y != IGNORE).sum())
    assert isinstance(batch["num_targets"], int)  # a host count: the loss denominator needs no GPU sync
    assert abs(float(w[y != IGNORE].sum()) - 3.0) < 1e-5  # each sequence's targets weigh 1 in total


def test_trainer_gradient_equals_direct_token_mean(model_and_tok, template, tmp_path):
    """One optimizer step over two accumulation micro-batches: the trainer's summed gradients equal
    the gradient of (sum of all token losses) / (all targets of the step)."""
    from transformers import TrainingArguments

    model, tok = model_and_tok
    model = copy.deepcopy(model)
    exs = [tokenize_chat(tok, c, template) for c in CONVS]
    ds = PackedDataset(exs, [[0, 1], [2, 3]])
    coll = PackCollator(pad_id=tok.pad_token_id)
    batches = [coll([ds[0]]), coll([ds[1]])]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=1, gradient_accumulation_steps=2,
                             use_cpu=True, report_to=[])
    for mode in ("token", "sequence"):
        g_trainer = {}
        for chunk in (0, 7):  # 7: the output head + cross-entropy in chunks of 7 positions (chunked_sft_loss)
            trainer = trainer_class()(model=model, args=args, data_collator=coll, loss_mode=mode, loss_chunk_size=chunk)
            got_batches, denom = trainer.get_batch_samples(iter(batches), 2, torch.device("cpu"))
            model.zero_grad()
            for b in got_batches:
                trainer.compute_loss(model, b, num_items_in_batch=denom).backward()
            g_trainer[chunk] = model.model.embed_tokens.weight.grad.clone()  # tied: the head's gradient too
        model.zero_grad()
        losses = []
        for k, b in enumerate(batches):
            lg = model(input_ids=b["input_ids"], position_ids=b["position_ids"], use_cache=False).logits
            ce = torch.nn.functional.cross_entropy(lg[0], b["labels"][0], ignore_index=IGNORE, reduction="none")
            if mode == "token":
                losses.append(ce[b["labels"][0] != IGNORE])
            else:
                start = 0
                for i in ds.packs[k]:
                    n = len(exs[i])
                    seg = ce[start:start + n][b["labels"][0][start:start + n] != IGNORE]
                    losses.append(seg.mean().reshape(1))
                    start += n
        direct = torch.cat(losses).mean()
        direct.backward()
        g_direct = model.model.embed_tokens.weight.grad
        for chunk, g in g_trainer.items():
            # chunked: the head's gradient is summed chunk by chunk, another fp32 order (in fp64 the two agree to 1e-15)
            assert torch.allclose(g, g_direct, atol=1e-6 if chunk == 0 else 1e-4, rtol=1e-4), (mode, chunk)
        assert float(denom) == (sum(e.n_targets for e in exs) if mode == "token" else 4)


def test_a_two_step_run_learns_at_its_first_step(model_and_tok, tmp_path):
    """The warmup ratio rounds down to whole steps: a 2-step run (smoke's capped runs) has no warmup step, whose
    learning rate would be 0; a long run keeps the paper's ratio."""
    from transformers import TrainingArguments

    from lwlib.training import warmup_steps

    assert (warmup_steps(0.03, 2), warmup_steps(0.05, 40), warmup_steps(0.03, 1000)) == (0, 2, 30)
    model, _ = model_and_tok
    for steps, warmup in ((2, 0), (100, 3)):
        args = TrainingArguments(output_dir=str(tmp_path), learning_rate=1e-4, warmup_steps=0.03, max_steps=steps,
                                 lr_scheduler_type="cosine", use_cpu=True, report_to=[])
        trainer = trainer_class()(model=model, args=args)
        trainer.create_optimizer_and_scheduler(num_training_steps=steps)
        assert trainer.args.warmup_steps == warmup
        if steps == 2:
            first = trainer.lr_scheduler.get_last_lr()[0]
            trainer.optimizer.step()  # no gradients: nothing changes
            trainer.lr_scheduler.step()
            assert first == pytest.approx(1e-4) and 0 < trainer.lr_scheduler.get_last_lr()[0] < first


def test_length_cap_drop_and_truncate():
    data = [[{"role": "user", "content": "q"}, {"role": "assistant", "content": " ".join(["w"] * n)}]
            for n in (10, 100, 1000)]
    assert [output_words(m) for m in apply_length_cap(data, 100, "drop")] == [10, 100]
    assert [output_words(m) for m in apply_length_cap(data, 100, "truncate")] == [10, 100, 100]
    assert apply_length_cap(data, None) == data


def test_load_sft_data_names_file_and_line(tmp_path):
    p = tmp_path / "d.jsonl"
    good = {"messages": CONVS[0]}
    p.write_text(json.dumps(good) + "\n" + json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    with pytest.raises(ValueError, match=r"d.jsonl:2: the last message must be the assistant's"):
        load_sft_data(p)
    p.write_text(json.dumps(good) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"d.jsonl:2: not valid JSON"):
        load_sft_data(p)
    p.write_text(json.dumps(good) + "\n\n")
    assert load_sft_data(p) == [CONVS[0]]


def test_long_data_from_a_hugging_face_id(tmp_path, monkeypatch):
    """sft.data_path "hf:THUDM/LongWriter-6k" (the paper's data) goes through datasets.load_dataset (stubbed
    here: no hub access) and into the mix with the length cap; a data set without "messages" is named."""
    import datasets
    from lwlib.sft import build_mix

    calls = []
    rows = [{"messages": [{"role": "user", "content": f"Write {n} words."},
                          {"role": "assistant", "content": " ".join(["w"] * n)}]} for n in (300, 3000, 30)]

    def fake_load(name, conf=None, split=None):
        calls.append((name, conf, split))
        return datasets.Dataset.from_list(rows if name == "THUDM/LongWriter-6k" else [{"text": "x"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    prof = load_profile("smoke", run_root=tmp_path)
    cfg = SFTConfig(data_path="hf:THUDM/LongWriter-6k", general_data="none", max_output_words=1000)
    data, stats = build_mix(prof, cfg)
    assert calls == [("THUDM/LongWriter-6k", None, "train")]
    assert sorted(output_words(m) for m in data) == [30, 300]
    assert (stats["long_path"], stats["long_examples"], stats["long_after_cap"]) == ("hf:THUDM/LongWriter-6k", 3, 2)
    with pytest.raises(ValueError, match=r"sft.data_path 'hf:other/set@test'.*no 'messages' column"):
        build_mix(prof, SFTConfig(data_path="hf:other/set@test", general_data="none"))
    assert calls[-1] == ("other/set", None, "test")


def test_general_data_jsonl_path_is_found_from_the_notebooks_folder(tmp_path, monkeypatch):
    """sft.general_data as a relative JSONL path: from the current directory when it is there, else from the
    repository (papermill runs the notebooks in notebooks/); the paper_rehearsal profile's general data."""
    from lwlib.sft import data_file, load_general

    rel = "results/gpu/sft/general_self_distill.jsonl"
    monkeypatch.chdir(REPO_ROOT / "notebooks")
    assert data_file(rel) == REPO_ROOT / rel and data_file("/abs/x.jsonl") == Path("/abs/x.jsonl")
    prof = load_profile("smoke", run_root=tmp_path)
    with pytest.warns(UserWarning, match="116 record"):  # the answers cut at the token limit are not data
        got = load_general(prof, SFTConfig(general_data=rel), 400)
    assert len(got) == 244 and all(m[-1]["role"] == "assistant" for m in got)
    (tmp_path / "results").mkdir()
    (tmp_path / rel.replace("results/gpu/sft/", "results/")).write_text(
        json.dumps({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}) + "\n")
    monkeypatch.chdir(tmp_path)
    assert load_general(prof, SFTConfig(general_data="results/general_self_distill.jsonl"), 5) == [
        [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]]  # the current directory's first
    with pytest.raises(FileNotFoundError, match="no SFT data at nope.jsonl"):
        load_general(prof, SFTConfig(general_data="nope.jsonl"), 5)


def _corpus_file(run_root: Path, sizes=(40, 130, 260, 600, 1400)) -> list[dict]:
    """Corpus-format records (a manifest book, so instructions can be written) where notebook 02 puts them."""
    para = "The harbour town woke slowly, and the gulls argued over the stones while the bakery opened its door."
    recs = []
    for k, n in enumerate(sizes):  # n paragraphs of 18 words
        text = "\n\n".join([para] * n)
        recs.append({"messages": [{"role": "user", "content": f"Write about {18 * n} words."},
                                  {"role": "assistant", "content": text}],
                     "id": f"1342-{k:04d}", "book_id": 1342, "lang": "en", "heading": None, "words": 18 * n})
    path = run_root / "smoke" / "corpus" / "longwriter.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return recs


def test_cut_mode_mixes_hold_the_same_text_and_the_main_mix_its_proportion(tmp_path):
    """(a)'s data by construction: every cap and the uncapped run hold the same words, only cut otherwise; (b)'s
    main mix: the corpus cut at general_passages_cut words as general data, long passages in proportion."""
    from lwlib.sft import _cap_cfg, build_mix, sft_runs

    recs = _corpus_file(tmp_path)
    prof = load_profile("smoke", run_root=tmp_path)
    cfg = SFTConfig(data_path="corpus", general_data="none", general_max=0, general_passages_cut=200,
                    long_min_words=1000, long_per_general=0.01, caps=[300, 2000], cap_mode="cut",
                    cap_general=False, cap_uncapped=True, seeds=2, arms={"general": "none"})
    total = sum(r["words"] for r in recs)
    for cap in (300, 2000, None):
        data, stats = build_mix(prof, _cap_cfg(cfg, cap))
        assert sum(output_words(m) for m in data) == total  # the same text in every arm of (a)
        assert max(output_words(m) for m in data) <= (cap or total) and stats["general_examples"] == 0
    assert len(build_mix(prof, _cap_cfg(cfg, 300))[0]) > len(recs)
    data, stats = build_mix(prof, cfg)  # the main run: general (the corpus cut at 200) + long passages in proportion
    assert stats["general_passages"] > len(recs) and stats["general_answers"] == 0
    assert stats["long_after_cap"] == round(stats["general_examples"] * 0.01) == 2  # of the 4 long enough
    assert all(output_words(m) >= 1000 for m in data[: stats["long_after_cap"]])
    assert 0 < stats["long_word_share"] < 1
    general, gstats = build_mix(prof, __import__("dataclasses").replace(cfg, data_path="none"))
    assert gstats["long_after_cap"] == 0 and len(general) == stats["general_examples"]
    runs = sft_runs(cfg)
    assert [r.tag for r in runs] == ["sft", "sft_general", "cap300", "cap2000", "uncapped",
                                     "sft-s1", "sft_general-s1", "cap300-s1", "cap2000-s1", "uncapped-s1"]
    assert [r.seed for r in runs] == [0] * 5 + [1] * 5 and runs[4].cfg.max_output_words is None
    assert runs[2].cfg.general_passages_cut is None and runs[2].cfg.long_per_general is None
    some = __import__("dataclasses").replace(cfg, runs=["main"])  # one sitting's selection; every=True: all kinds
    assert [r.tag for r in sft_runs(some)] == ["sft", "sft-s1"]
    assert [r.tag for r in sft_runs(some, every=True)] == [r.tag for r in runs]


def test_seed_tags_and_folders(tmp_path):
    from lwlib.models import run_model, seed_tag, sft_folder, split_seed
    from lwlib.sft import arm_dir

    assert [seed_tag("cap500", k) for k in (0, 2)] == ["cap500", "cap500-s2"]
    assert split_seed("sft_general-s2") == ("sft_general", 2) and split_seed("cap500") == ("cap500", 0)
    assert sft_folder(tmp_path, "sft-s1") == tmp_path / "sft" / "s1" / "model"
    assert sft_folder(tmp_path, "uncapped-s2") == tmp_path / "sft" / "uncapped-s2" / "model"
    with pytest.raises(ValueError, match="not a tag of notebook 03"):
        sft_folder(tmp_path, "dpo")
    prof = load_profile("smoke", run_root=tmp_path)
    with pytest.raises(FileNotFoundError, match="no cap500-s1 checkpoint .*03_sft.ipynb"):
        run_model(prof, "cap500-s1")
    with pytest.raises(FileNotFoundError, match="dpo/s1/model"):
        run_model(prof, "dpo-s1")
    assert run_model(prof, "base") == prof.model and run_model(prof, "some/hub-id") == "some/hub-id"
    for bad in ("s1", "cap9", "uncapped"):
        with pytest.raises(ValueError, match="sft.arms"):
            arm_dir(prof, bad)


def assert_every_parameter_changed(before, after, what: str) -> None:
    """Every trainable parameter of ``before`` differs in ``after`` (TRL's test of its trainers): a parameter
    that a training run leaves as it was (detached, frozen, or cut off from the loss) fails, naming it."""
    trained = dict(after.named_parameters())
    assert set(trained) == {n for n, _ in before.named_parameters()}
    unchanged = [n for n, p in before.named_parameters() if p.requires_grad and torch.equal(p, trained[n])]
    assert not unchanged, f"{what} left {len(unchanged)} trainable parameters unchanged: {unchanged[:5]}"


def test_cpu_training_changes_weights_lowers_loss_and_reloads(tmp_path, model_and_tok, monkeypatch):
    """A real run of a few steps on the bundled model: all data in one pack, so every step sees the
    same tokens and the loss must fall; every trainable parameter changes; the checkpoint reloads and
    generates. The step timer records every step's wall time and profiles the steps it is asked to."""
    from lwlib.backends import GenParams, LocalBackend
    from lwlib.models import load_model

    monkeypatch.setenv("LWLIB_TRAIN_PROFILE", "2:3")
    prof = load_profile("smoke", run_root=tmp_path)
    cfg = SFTConfig(packing_length=1024, batch_size=1, per_device_batch_size=1, learning_rate=1e-4, max_steps=4,
                    warmup_ratio=0.0, gradient_checkpointing=True, general_data="none")
    data = CONVS * 2
    out = train_sft(prof, cfg, data=data)
    log = load_train_log(out)
    assert len(log) == 4 and log["loss"].iloc[-1] < log["loss"].iloc[0]
    train_log = json.loads((out.parent / "train_log.json").read_text())
    seconds, peak = train_log["step_seconds"], train_log["peak_memory"]
    assert len(seconds) == 4 and all(s > 0 for s in seconds)
    assert peak["cpu_max_rss_bytes"] > 100e6
    assert (peak["gpu_allocated_bytes"] is None) == (not torch.cuda.is_available())
    profiled = json.loads((out.parent / "train_profile.json").read_text())
    assert profiled["steps"] == 2 and profiled["wall_ms_per_step"] > 0
    assert profiled["top_cpu_ops"] and all(op["self_ms_per_step"] >= 0 for op in profiled["top_cpu_ops"])
    stats = json.loads((out.parent / "data_stats.json").read_text())
    assert stats["examples"] == len(data) and stats["packs"] == 1
    optim = json.loads((out.parent / "manifest.json").read_text())["config"]["optimizer"]
    assert (optim["weight_decay"], optim["adam_beta1"], optim["adam_beta2"]) == (0.1, 0.9, 0.95)  # the paper's AdamW
    assert optim["lr_scheduler_type"] == "cosine" and optim["learning_rate"] == 1e-4
    trained, tok = load_model(str(out), device="cpu", dtype="float32")
    base = model_and_tok[0]
    delta = sum((a - b).abs().sum().item() for a, b in zip(trained.parameters(), base.parameters()))
    assert delta > 0
    assert_every_parameter_changed(base, trained, "SFT")
    g = LocalBackend(trained, tok, batch_size=1).generate([[{"role": "user", "content": "Name a colour."}]],
                                                         GenParams(max_new_tokens=8, temperature=0.0))[0]
    assert g.error is None and g.completion_tokens > 0
    # a second call reuses the finished model instead of retraining
    mtime = (out / "model.safetensors").stat().st_mtime
    assert train_sft(prof, cfg, data=data) == out and (out / "model.safetensors").stat().st_mtime == mtime


def test_a_run_stopped_after_its_last_checkpoint_ends_from_it_without_a_step_more(tmp_path, model_and_tok):
    """Stopped after saving the checkpoint of its last step but before writing the model, a run resumes to that
    model: transformers' Trainer resumed from the final checkpoint would train a step past max_steps."""
    from safetensors.torch import load_file

    from lwlib.runs import model_fingerprint

    prof = load_profile("smoke", run_root=tmp_path)
    cfg = SFTConfig(packing_length=256, batch_size=1, per_device_batch_size=1, learning_rate=1e-4, max_steps=2,
                    warmup_ratio=0.0, general_data="none", save_steps=1, liger_kernel=False)
    out = train_sft(prof, cfg, data=CONVS)
    first, fingerprint = load_file(out / "model.safetensors"), model_fingerprint(out)
    log = json.loads((out.parent / "train_log.json").read_text())
    shutil.rmtree(out)
    (out.parent / "train_log.json").unlink()  # (as if stopped while the model was being written)
    assert train_sft(prof, cfg, data=CONVS) == out
    again = json.loads((out.parent / "train_log.json").read_text())
    assert again["global_step"] == 2 and again["finished_from"] == "checkpoint-2"
    assert [h["loss"] for h in again["log_history"] if "loss" in h] == [h["loss"] for h in log["log_history"]
                                                                         if "loss" in h]
    second = load_file(out / "model.safetensors")
    assert all(torch.equal(first[k], second[k]) for k in first) and set(first) == set(second)
    assert model_fingerprint(out) == fingerprint  # the same files: its probe records stay valid


@pytest.mark.parametrize("name", ["ds_zero3.json", "ds_zero3_offload.json"])
def test_deepspeed_configs_validate(name):
    """The shipped ZeRO-3 configs, with transformers' "auto" values filled as the Trainer does, pass
    the installed DeepSpeed's config validation (the official stage3.json fails on DeepSpeed >= 0.15)."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from transformers import TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    path = REPO_ROOT / "env" / name
    cfg = HfTrainerDeepSpeedConfig(str(path))
    args = TrainingArguments(output_dir="/tmp/x", per_device_train_batch_size=1, gradient_accumulation_steps=8,
                             learning_rate=1e-5, weight_decay=0.1, adam_beta2=0.95, report_to=[], use_cpu=True)
    cfg.trainer_config_process(args)
    cfg.trainer_config_finalize(args, model=None, num_training_steps=100)
    assert "auto" not in json.dumps(cfg.config)
    zero = DeepSpeedZeroConfig(**cfg.config["zero_optimization"])  # pydantic: unknown/deprecated keys fail
    assert zero.stage == 3
    assert (zero.offload_optimizer is not None) == ("offload" in name)


def test_sft_config_rejects_bad_values():
    with pytest.raises(ValueError, match="sft.loss"):
        SFTConfig(loss="mean")
    with pytest.raises(ValueError, match="loss_chunk_size"):
        SFTConfig(loss_chunk_size=-1)
    with pytest.raises(ValueError, match="per_device_batch_size"):
        SFTConfig(batch_size=3, per_device_batch_size=2)
    with pytest.raises(ValueError, match="liger_kernel"):
        SFTConfig(liger_kernel="yes")
    with pytest.raises(ValueError, match="sft.rebuild must be a list of run tags"):
        SFTConfig(rebuild="sft")
    from lwlib.sft import rebuild_tags
    cfg = SFTConfig(caps=[500], seeds=2, rebuild=["sft-s1", "cap500", "cap1000"])
    with pytest.raises(ValueError, match=r"sft.rebuild names \['cap1000'\], which are not runs of this profile"):
        rebuild_tags(cfg)


def test_liger_kernel_setting_resolves_per_machine_and_deepspeed_config():
    """auto: on only with CUDA, the package, no ZeRO-3 and no torch.compile; true where it cannot run is an error,
    not a silent off."""
    zero3, zero2 = str(REPO_ROOT / "env" / "ds_zero3_offload.json"), None
    assert pick_liger("auto", cuda=False, ds_cfg=None) is False
    assert pick_liger("auto", cuda=True, ds_cfg=zero3) is False
    assert pick_liger(False, cuda=True, ds_cfg=zero2) is False
    with pytest.raises(ValueError, match="ZeRO-3.*ds_zero3_offload.json"):
        pick_liger(True, cuda=True, ds_cfg=zero3)
    with pytest.raises(RuntimeError, match="needs CUDA"):
        pick_liger(True, cuda=False, ds_cfg=None)
    assert pick_liger("auto", cuda=True, ds_cfg=None, compiled=True) is False
    with pytest.raises(ValueError, match="torch_compile"):
        pick_liger(True, cuda=True, ds_cfg=None, compiled=True)


def test_deepspeed_without_a_launcher_gets_a_world_of_one(monkeypatch):
    """A notebook's kernel (no torchrun) with a DeepSpeed config: the launcher's variables for one rank, so that
    accelerate starts DeepSpeed's process group instead of DeepSpeed looking for MPI; a launcher's are kept."""
    import os

    from lwlib.training import LAUNCHER_VARS, batch_plan, launcher_env

    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS})  # restored
    assert launcher_env(None) == {} and not any(v in os.environ for v in LAUNCHER_VARS)
    env = launcher_env(str(REPO_ROOT / "env" / "ds_zero3_offload.json"))
    assert {k: env[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR")} == {
        "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    assert int(os.environ["MASTER_PORT"]) > 0 and batch_plan(8, 1, "sft") == (1, 8)  # the paper's 8 packs: 8 micro
    monkeypatch.setenv("WORLD_SIZE", "8")  # torchrun's ranks
    monkeypatch.setenv("RANK", "3")
    assert launcher_env("ds.json") == {} and os.environ["RANK"] == "3"


def test_attention_choice_per_machine_and_compilation(monkeypatch):
    """auto: sdpa on CPU; on CUDA FlashAttention-4's varlen kernels where flash-attn-4 runs (Hopper/Blackwell),
    else flash-attn 2, else PyTorch's varlen kernel when compiled (1.6x eager flex on an H100) and flex_attention
    when not (faster than eager varlen); varlen kernels take flattened packs. flash-attn-4 alone installs the
    namespace package ``flash_attn`` (no ``flash_attn_2_cuda``): that is not flash-attn 2."""
    import lwlib.attention as attention

    assert attention.pick_attn("auto", "cpu", compiled=True) == "sdpa"
    assert attention.pick_attn("eager", "cuda") == "eager"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(attention, "varlen_available", lambda: True)
    monkeypatch.setattr(attention, "fa4_available", lambda: False)
    monkeypatch.setattr(attention.importlib.util, "find_spec", lambda name: object() if name == "flash_attn" else None)
    assert attention.pick_attn("auto", "cuda", compiled=True) == VARLEN_ATTENTION
    assert attention.pick_attn("auto", "cuda", compiled=False) == "flex_attention"
    assert attention.pick_attn("auto", "cpu", compiled=True) == "sdpa"  # the profile's device wins
    monkeypatch.setattr(attention.importlib.util, "find_spec", lambda name: object() if name == "flash_attn_2_cuda" else None)
    assert attention.pick_attn("auto", "cuda", compiled=True) == "flash_attention_2"
    monkeypatch.setattr(attention, "fa4_available", lambda: True)
    assert attention.pick_attn("auto", "cuda", compiled=True) == FA4_ATTENTION
    assert attention.pick_attn("auto", "cuda", compiled=False) == FA4_ATTENTION
    assert attention.pick_attn("auto", "cpu", compiled=True) == "sdpa"
    assert [flat_packs(a) for a in (VARLEN_ATTENTION, FA4_ATTENTION, "flash_attention_2", "flex_attention",
                                    "sdpa")] == [True, True, True, False, False]
    # DPO's batches are padded, not flattened packs: sdpa unless flash-attn 2 (which handles padding) is there
    assert attention.pick_padded_attn("cuda") == "sdpa" and attention.pick_padded_attn("cpu") == "sdpa"
    monkeypatch.setattr(attention, "fa4_available", lambda: False)
    assert attention.pick_padded_attn("cuda") == "flash_attention_2"


def test_profiles_have_sft_sections():
    for name in ("smoke", "gpu", "gpu_short", "paper", "paper_rehearsal"):
        cfg = load_profile(name).section("sft", SFTConfig)
        assert cfg.loss == "token"
    paper = load_profile("paper").section("sft", SFTConfig)
    assert (paper.learning_rate, paper.packing_length, paper.batch_size, paper.epochs) == (1e-5, 32768, 8, 4)
    assert (paper.warmup_ratio, paper.weight_decay, paper.adam_beta2) == (0.03, 0.1, 0.95)
    assert Path(REPO_ROOT / paper.deepspeed).exists()


def test_official_style_float_prefetch_bucket_is_rejected():
    """Why the official stage3.json breaks: "auto" becomes 0.9 * hidden^2, a float, which DeepSpeed
    >= 0.15 refuses for stage3_prefetch_bucket_size; the shipped configs give integers."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    with pytest.raises(Exception, match="prefetch_bucket_size"):
        DeepSpeedZeroConfig(stage=3, stage3_prefetch_bucket_size=0.9 * 4096 * 4096)


LONG_TEXT = (
    "The harbour town woke slowly. Fishermen checked their nets while the bakery on the corner pushed warm "
    "air into the street, and the gulls argued over whatever the night tide had left on the stones. "
)


def _write_agentwrite_output(run_root: Path, sizes=(2, 5, 9)) -> Path:
    """A small LongWriter-6k-format file where notebook 02 would put it (~34 words per unit of size)."""
    path = run_root / "smoke" / "agentwrite" / "longwriter.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for k, n in enumerate(sizes):
            msgs = [{"role": "user", "content": f"Write a {n * 40}-word story about a harbour town (part {k})."},
                    {"role": "assistant", "content": (LONG_TEXT * n).strip()}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def test_rebuild_trains_again_a_run_whose_checkpoint_is_gone_and_compares_the_losses(tmp_path):
    """A later sitting needs the checkpoint of a run an earlier one trained and probed (DPO's start model): rebuild
    trains it again from the same data and seed, keeps the recorded log and compares the loss curves (equal on a
    CPU; the comparison is lwlib.training.compare_losses, which refuses curves of other steps: test_zero3.py); a run
    never trained is refused."""
    from lwlib.runs import model_fingerprint
    from lwlib.sft import SFTRun, rebuild_run, train_run

    _write_agentwrite_output(tmp_path, sizes=(1, 2))
    prof = load_profile("smoke", run_root=tmp_path)
    cfg = SFTConfig(data_path="agentwrite", general_data="none", packing_length=256, batch_size=1,
                    per_device_batch_size=1, learning_rate=1e-4, max_steps=2, warmup_ratio=0.0, liger_kernel=False)
    run = SFTRun("cap200", "cap", 0, cfg, "test")
    with pytest.raises(FileNotFoundError, match="never trained"):
        rebuild_run(prof, run)
    folder = train_run(prof, run)
    recorded = (folder.parent / "train_log.json").read_bytes()
    shutil.rmtree(folder)  # (a session does not keep its checkpoints)
    assert rebuild_run(prof, run) == folder and (folder / "config.json").exists()
    assert (folder.parent / "train_log.recorded.json").read_bytes() == recorded
    report = json.loads((folder.parent / "rebuild.json").read_text())
    assert report["steps"] == 2 and report["within_tol"] and report["max_rel_loss_difference"] < 1e-6
    assert report["at_step"] in (1, 2) and report["first_loss"][0] == pytest.approx(report["first_loss"][1], rel=1e-6)
    mtime = (folder / "model.safetensors").stat().st_mtime
    assert rebuild_run(prof, run) == folder and (folder / "model.safetensors").stat().st_mtime == mtime  # kept
    # the stores name it by the run it rebuilds, not its weights: what this rebuild makes resumes with the next
    # sitting's (lwlib.runs.model_fingerprint, tested on other weights in test_faults.py)
    assert "@rebuilt-" in model_fingerprint(folder, prof.run_dir)


@pytest.mark.parametrize("seeds", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_notebook_03_smoke(tmp_path, seeds):
    """Notebook 03 end to end: the main run, the general-only arm and two caps, probed under both decodings, the
    (a) and (b) tables and figures; with 2 seeds (slow: twice the runs) every run again as ``-s1``."""
    from nbutil import execute_notebook

    _write_agentwrite_output(tmp_path / "runs", sizes=(1, 2, 5))
    overrides = {
        "probe.lengths": [1000], "probe.max_new_tokens": 16, "sft.data_path": "agentwrite", "sft.general_per_long": 0.7,
        "sft.general_max": 3, "sft.arms": {"general": "none"}, "sft.self_distill_max_new_tokens": 128,
        "sft.general_passages_cut": None, "sft.long_min_words": None, "sft.long_per_general": None,
        "sft.cap_mode": "drop", "sft.cap_uncapped": False, "sft.cap_general": True, "sft.seeds": seeds,
        "sft.packing_length": 512, "sft.max_steps": 2, "sft.caps": [50, 200], "sft.cap_max_steps": 1}
    out = execute_notebook("03_sft.ipynb", tmp_path, overrides=overrides)
    run = tmp_path / "runs" / "smoke"
    metrics = json.loads((run / "sft" / "metrics.json").read_text())
    assert metrics["mix"]["long_examples"] == 3 and metrics["mix"]["general_source"] == "self-distill"
    assert json.loads((run / "sitting.json").read_text()) == {"waiting": {}}  # no limit: nothing left waiting
    runs = {r["run"]: r for r in metrics["runs"]}
    tags = ["sft", "sft_general", "cap50", "cap200"]
    tags += [f"{t}-s1" for t in tags] if seeds == 2 else []
    assert set(runs) == set(tags)
    assert runs["cap50"]["data_max_output_words"] <= 50 < runs["cap200"]["data_max_output_words"] <= 200
    for tag in ["base"] + tags:
        for dec in ("paper", "loopfree"):  # every model under both decodings
            assert (run / "probe" / tag / dec / "generations.jsonl").exists(), (tag, dec)
    assert (run / "sft" / "model" / "config.json").exists() and (run / "sft" / "cap200" / "model").exists()
    if seeds == 2:
        assert (run / "sft" / "s1" / "model" / "config.json").exists()  # the main run of seed 1
        assert (run / "sft" / "cap200-s1" / "model").exists()
        s0, s1 = (json.loads((run / "sft" / d / "data_stats.json").read_text()) for d in ("cap50", "cap50-s1"))
        assert (s0["seed_index"], s1["seed_index"]) == (0, 1) and s0["tokens"] == s1["tokens"]  # the same data
    arms = json.loads((run / "sft" / "arms.json").read_text())
    assert set(arms) == {"paper", "loopfree"} and arms["loopfree"]["arms"] == ["sft", "sft_general"]
    assert arms["loopfree"]["seeds"] == list(range(seeds))
    caps = json.loads((run / "sft" / "cap_experiment.json").read_text())
    assert set(caps) == {"paper", "loopfree"} and caps["loopfree"]["runs"] == ["cap50", "cap200", "sft"]
    for v in caps["loopfree"]["by_seed"].values():  # every designed run measured: nothing left to place
        lb = v["lower_bound"][:-1]
        assert v["spearman_best"] is None if any(lb) else isinstance(v["spearman_best"], float)
    for name in ("sft_loss.png", "sft_loss_all.png", "ruler_base_vs_sft.png", "sft_length_cap_experiment.png",
                 "sft_length_cap_experiment_paper.png", "sft_arms_max_length.png"):
        assert (tmp_path / "figures" / "smoke" / name).stat().st_size > 10_000
    for name in ("sft_loss.png", "sft_loss_all.png", "ruler_base_vs_sft.png", "sft_length_cap_experiment.png",
                 "sft_arms_max_length.png"):
        assert check_figure(tmp_path / "figures" / "smoke" / name) == [], name
    text = out.read_text()
    assert "Table (b), the SFT arms" in text and "Table (a), the controlled experiment" in text
    assert text.count("image/png") >= 6  # every figure shown, sft_loss_all.png included
    assert "Setting accelerator to CPU" not in text  # DeepSpeed's warning on a CPU (lwlib.training)
    if seeds == 2:  # a later sitting: seed 1's main run again for DPO (sft.rebuild), its probes read back as they are
        shutil.rmtree(run / "sft" / "s1" / "model")
        probes = run / "probe" / "sft-s1" / "loopfree" / "generations.jsonl"
        mtime = probes.stat().st_mtime
        execute_notebook("03_sft.ipynb", tmp_path, overrides={**overrides, "sft.rebuild": ["sft-s1"]})
        assert (run / "sft" / "s1" / "model" / "config.json").exists() and probes.stat().st_mtime == mtime
        assert json.loads((run / "sft" / "s1" / "rebuild.json").read_text())["within_tol"]
        assert not (run / "sft" / "cap50" / "rebuild.json").exists()  # only what was named


def test_train_cli_parses_overrides():
    from lwlib.train import parse_sets

    assert parse_sets(["sft.max_steps=10", "sft.caps=[500, 1000]", "sft.deepspeed=null"]) == {
        "sft.max_steps": 10, "sft.caps": [500, 1000], "sft.deepspeed": None}
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        parse_sets(["sft.max_steps"])


def test_checkpointing_arguments_raise_no_deprecation_warning(tmp_path):
    import warnings

    from transformers import TrainingArguments

    from lwlib.training import checkpointing_args

    for on in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **checkpointing_args(on))
        assert args.gradient_checkpointing is on  # the old name still reads the setting (TRL reads it)
        if on:
            assert (args.gradient_checkpointing_kwargs or {}).get("use_reentrant") is False
