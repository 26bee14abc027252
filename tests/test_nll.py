"""NLL by position: per-token NLL against the model's own loss, chunked = unchunked, batched = single,
the cumulative-average curve on hand values, the stage (resume, fallback) and notebook 05."""

import json

import numpy as np
import pytest
import torch

from lwlib.config import load_profile
from lwlib.logprobs import encode_conversation, token_nll
from lwlib.nll import NLLConfig, cumulative_average, cumulative_curve, load_conversations, run_nll
from lwlib.plots import check_figure
from lwlib.runs import read_jsonl
from nbutil import execute_notebook

MESSY = [
    [{"role": "user", "content": "Write a 300-word blog post about tide pools.  Use headings!"},
     {"role": "assistant", "content": "## Tide Pools\n\nAt low tide, the rocks reveal small worlds — anemones, "
                                      "crabs & sea stars…\n\n* Look, don't touch.\n* Watch the waves!\n\n"
                                      "In 1897, naturalists counted 42 species here."}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "请写一首关于秋天的短诗"},
     {"role": "assistant", "content": "秋风起，落叶黄。\n雁南飞，夜渐长。"}],
    [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "Hi!"}],
]


def test_cumulative_average_on_hand_values():
    assert np.allclose(cumulative_average([2.0, 4.0, 0.0]), [2.0, 3.0, 2.0])
    assert len(cumulative_average([])) == 0
    curve = cumulative_curve([[2.0, 4.0, 0.0], [4.0, 0.0], [1.0]])
    # sample cum-avgs: [2, 3, 2], [4, 2], [1]; position 1: (2+4+1)/3, 2: (3+2)/2, 3: 2/1
    assert curve["position"].tolist() == [1, 2, 3]
    assert np.allclose(curve["cum_avg_nll"], [7 / 3, 2.5, 2.0])
    assert curve["samples"].tolist() == [3, 2, 1]
    assert cumulative_curve([]).empty


def test_response_tokens_are_the_assistant_text(model_and_tok):
    _, tok = model_and_tok
    ids, start, n = encode_conversation(tok, MESSY[0])
    assert tok.decode(ids[start:]) == MESSY[0][1]["content"]
    ids_e, start_e, n_e = encode_conversation(tok, MESSY[0], include_end_token=True)
    assert n_e == n + 1 and tok.decode(ids_e[-1:]) == "<|im_end|>"
    cut, s2, n2 = encode_conversation(tok, MESSY[0], max_tokens=start + 5)
    assert s2 == start and n2 == 5 and cut == ids[: start + 5]
    with pytest.raises(ValueError, match="assistant"):
        encode_conversation(tok, MESSY[0][:1])


def test_token_nll_equals_the_models_loss(model_and_tok):
    model, tok = model_and_tok
    for conv in MESSY:
        nll = token_nll(model, tok, [conv])[0]
        ids, start, n = encode_conversation(tok, conv)
        x = torch.tensor([ids])
        labels = x.clone()
        labels[:, :start] = -100
        with torch.no_grad():
            loss = model(input_ids=x, labels=labels, use_cache=False).loss.item()
        assert len(nll) == n
        assert nll.mean() == pytest.approx(loss, abs=1e-4)


def test_chunked_and_batched_give_the_same_values(model_and_tok):
    model, tok = model_and_tok
    whole = [token_nll(model, tok, [c], batch_size=1, chunk_size=0)[0] for c in MESSY]
    chunked = token_nll(model, tok, MESSY, batch_size=1, chunk_size=7)
    batched = token_nll(model, tok, MESSY, batch_size=3, chunk_size=5)
    for w, c, b in zip(whole, chunked, batched):
        assert len(w) == len(c) == len(b)
        np.testing.assert_allclose(c, w, atol=1e-4)
        np.testing.assert_allclose(b, w, atol=1e-3)  # padding changes the kernel's summation order only


def _write_convs(path, convs):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"messages": c}, ensure_ascii=False) + "\n" for c in convs), encoding="utf-8")


def test_run_nll_falls_back_resumes_and_rejects_bad_files(tmp_path, model_and_tok, capsys):
    prof = load_profile("smoke", run_root=tmp_path)
    _write_convs(prof.run_dir / "agentwrite" / "longwriter.jsonl", MESSY)
    cfg = NLLConfig(max_samples=2, batch_size=2, chunk_size=16)
    df = run_nll(prof, "base", cfg, model_and_tok=model_and_tok)
    assert "no held-out file" in capsys.readouterr().out
    assert len(df) == 2 and all(len(x) == t for x, t in zip(df["nll"], df["tokens"]))
    again = run_nll(prof, "base", cfg, model_and_tok=(None, None))  # nothing left to compute
    assert len(again) == 2 and len(read_jsonl(prof.run_dir / "nll" / "base" / "token_nll.jsonl")) == 2
    curve = (prof.run_dir / "nll" / "base" / "curve.csv").read_text().splitlines()
    assert curve[0] == "position,cum_avg_nll,samples" and len(curve) - 1 == df["tokens"].max()

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl: record 1"):
        load_conversations(bad)


def test_scores_of_a_gone_checkpoint_are_read_back(tmp_path, model_and_tok, capsys):
    """``sft`` scored in an earlier sitting whose checkpoint is gone: its complete records are read back (no model,
    no fingerprint check); one conversation short, the missing checkpoint is an error again."""
    import shutil

    from lwlib.models import sft_folder
    from lwlib.nll import nll_before, nll_tags

    prof = load_profile("smoke", run_root=tmp_path)
    _write_convs(prof.run_dir / "agentwrite" / "heldout.jsonl", MESSY)
    cfg = NLLConfig(models=["base", "sft", "dpo"], max_samples=2, batch_size=2, chunk_size=16)
    model, tok = model_and_tok
    folder = sft_folder(prof.run_dir, "sft")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    scored = run_nll(prof, "sft", cfg, model_and_tok=model_and_tok)
    shutil.rmtree(folder)
    back = run_nll(prof, "sft", cfg)  # no checkpoint, no model: the records
    assert sorted(back["id"]) == sorted(scored["id"]) and back["nll"].tolist() == scored.sort_values("id")["nll"].tolist()
    assert nll_before(prof, "sft", cfg)["mean_nll"].tolist() == back["mean_nll"].tolist()
    assert nll_tags(prof, cfg) == ["base", "sft"]
    out = capsys.readouterr().out
    assert "skipping 'dpo'" in out and "'sft': its checkpoint is gone" in out
    more = NLLConfig(models=["sft"], max_samples=3)
    assert nll_before(prof, "sft", more) is None and nll_tags(prof, more) == []
    with pytest.raises(FileNotFoundError, match="no sft checkpoint"):
        run_nll(prof, "sft", more)


def test_notebook_05_smoke(tmp_path):
    _write_convs(tmp_path / "runs" / "smoke" / "agentwrite" / "heldout.jsonl", MESSY)
    out = execute_notebook("05_nll_by_position.ipynb", tmp_path, overrides={"nll.data_path": None})
    text = out.read_text()
    assert "skipping 'sft'" in text  # no sft/dpo checkpoints in this run
    assert check_figure(tmp_path / "figures" / "smoke" / "nll_by_position.png") == []  # written, readable
    rows = read_jsonl(tmp_path / "runs" / "smoke" / "nll" / "base" / "token_nll.jsonl")
    assert len(rows) == 2
