"""The bundled real model, the local batched backend and the OpenAI backend against a loopback server."""

import time
from pathlib import Path

import pytest

from lwlib.backends import GenParams, OpenAIBackend
from lwlib.models import bundled_gguf_path, load_tokenizer, resolve_model
from lwlib.serve import serve

PROMPTS = ["Name three colors.", "Write a haiku about rain.", "What is the capital of France?", "Say hi."]


def test_bundled_model_facts(model_and_tok):
    model, tok = model_and_tok
    assert bundled_gguf_path("smollm2-135m-instruct").name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert (Path(resolve_model("smollm2-135m-instruct")) / "model.safetensors").exists()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.max_position_embeddings == 8192
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|im_end|>")


def test_eos_equal_to_bos_is_repaired_from_the_model_config(tmp_path):
    """transformers 5.17 (the H100 image) converted SmolLM2's GGUF tokenizer with eos = pad = <|im_start|>, the
    BOS; SFT/DPO checkpoints then carried it. load_tokenizer takes the config's EOS (<|im_end|>) instead."""
    import shutil
    from transformers import AutoTokenizer

    src = Path(resolve_model("smollm2-135m-instruct"))
    broken = AutoTokenizer.from_pretrained(src)
    broken.eos_token = broken.pad_token = "<|im_start|>"
    broken.save_pretrained(tmp_path)
    shutil.copy(src / "config.json", tmp_path / "config.json")
    assert AutoTokenizer.from_pretrained(tmp_path).eos_token == "<|im_start|>"  # the broken state is real
    with pytest.warns(UserWarning, match="equals its BOS"):
        tok = load_tokenizer(tmp_path)
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token) == ("<|im_end|>", 2, "<|im_end|>")
    assert tok.bos_token == "<|im_start|>"
    (tmp_path / "config.json").unlink()  # no config to consult: left as it is, no crash
    assert load_tokenizer(tmp_path).eos_token == "<|im_start|>"


def test_batched_equals_one_by_one_greedy(local_backend):
    p = GenParams(max_new_tokens=16, temperature=0)
    batched = local_backend.generate(PROMPTS, p)
    single = [local_backend.generate([x], p)[0] for x in PROMPTS]
    assert [g.text for g in batched] == [g.text for g in single]
    assert all(g.text.strip() for g in batched)
    assert [g.completion_tokens for g in batched] == [g.completion_tokens for g in single]


def test_per_item_limits_and_finish_reason(local_backend):
    gens = local_backend.generate(PROMPTS[:3], GenParams(temperature=0), max_new_tokens=[3, 40, 6])
    assert gens[0].completion_tokens == 3 and gens[0].hit_limit
    assert gens[2].completion_tokens == 6 and gens[2].hit_limit
    # "Name three colors." ends by itself well within 40 tokens; its count includes the end token
    assert gens[1].finish_reason == "length" or gens[1].completion_tokens <= 40
    assert gens[0].prompt_tokens > 10


def test_sampling_is_seeded(local_backend):
    p = GenParams(max_new_tokens=12, temperature=0.9, seed=123)
    a = local_backend.generate(PROMPTS[:2], p)
    b = local_backend.generate(PROMPTS[:2], p)
    assert [g.text for g in a] == [g.text for g in b]


def test_openai_backend_against_loopback_server(chat_server, local_backend):
    be = OpenAIBackend(chat_server.model, base_url=chat_server.url, concurrency=2, max_retries=0)
    p = GenParams(max_new_tokens=12, temperature=0)
    api = be.generate(PROMPTS[:2], p)
    local = local_backend.generate(PROMPTS[:2], p)
    assert [g.text for g in api] == [g.text for g in local]
    assert all(g.error is None and g.prompt_tokens > 0 and g.completion_tokens > 0 for g in api)


def test_samples_of_one_prompt_differ_through_a_server_that_seeds_each_request(chat_server):
    """A server seeds each request (vLLM, lwlib.serve): k samples of one prompt with one seed would be one output k
    times (DPO's 4 samples: no pair). Marked samples (samples_params) carry different seeds; unmarked ones repeat."""
    from lwlib.backends import SAMPLE_SEED_STRIDE, request_seed, samples_params

    assert [request_seed(p) for p in samples_params(GenParams(seed=3), 3)] == [3, 3 + SAMPLE_SEED_STRIDE,
                                                                             3 + 2 * SAMPLE_SEED_STRIDE]
    assert request_seed(GenParams(seed=None, sample=2)) is None
    be = OpenAIBackend(chat_server.model, base_url=chat_server.url, concurrency=1, max_retries=0)
    p = GenParams(max_new_tokens=24, temperature=1.0, seed=0)
    prompt = ["Tell me a story about a dragon."]
    same = [g.text for g in be.generate(prompt * 2, p)]
    assert same[0] == same[1]  # one seed, one output: what the stages sent before
    marked = [g.text for g in be.generate(prompt * 3, samples_params(p, 3))]
    assert marked[0] == same[0] and len(set(marked)) == 3


def test_openai_backend_retries_server_errors(local_backend):
    with serve(local_backend, fail_first=2) as server:
        be = OpenAIBackend(server.model, base_url=server.url, max_retries=3, backoff_s=0.01)
        g = be.generate(["Say hi."], GenParams(max_new_tokens=4, temperature=0))[0]
        assert g.error is None and g.text and server.requests == 3
        be0 = OpenAIBackend(server.model, base_url=server.url, max_retries=0)
        server.fail_first = server.requests + 1
        bad = be0.generate(["Say hi."], GenParams(max_new_tokens=4))[0]
        assert bad.finish_reason == "error" and "InternalServerError" in bad.error and bad.text == ""


def test_openai_backend_timeout_is_reported_not_raised(local_backend):
    with serve(local_backend, delay_s=2.0) as server:
        be = OpenAIBackend(server.model, base_url=server.url, max_retries=1, timeout_s=0.3, backoff_s=0.01)
        t0 = time.perf_counter()
        g = be.generate(["Say hi."], GenParams(max_new_tokens=4))[0]
        assert g.finish_reason == "error" and "Timeout" in g.error
        assert time.perf_counter() - t0 < 2.0  # two attempts of 0.3 s, not the server's 2 s


def test_missing_api_key_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("LWLIB_TEST_NO_KEY", raising=False)
    with pytest.raises(ValueError, match=r"\$LWLIB_TEST_NO_KEY"):
        OpenAIBackend("gpt-4o", api_key_env="LWLIB_TEST_NO_KEY")


def test_serve_cli_help():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "lwlib.serve", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    for opt in ("--model", "--host", "--port", "--batch-size", "--device", "--dtype", "--model-name"):
        assert opt in r.stdout


def test_serve_cli_serves_the_bundled_model_until_interrupted():
    """``python -m lwlib.serve --port 0``: prints its URL, answers the OpenAI client, and on Ctrl-C (SIGINT) stops
    cleanly while it generates (a request for 7,000 tokens that ignores the end token: minutes on a CPU). It installs
    its own SIGINT handler, so this holds also when it was started with SIGINT ignored (tests/test_faults.py runs
    this test that way)."""
    import json
    import os
    import re
    import signal
    import subprocess
    import sys
    import threading
    import urllib.request

    import openai

    from lwlib.runs import REPO_ROOT

    p = subprocess.Popen([sys.executable, "-m", "lwlib.serve", "--port", "0", "--device", "cpu", "--model-name", "tiny"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
                         env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    try:
        line = p.stdout.readline()
        m = re.search(r"serving model 'tiny' on cpu at (http://127\.0\.0\.1:\d+/v1)", line)
        assert m, (line, p.stderr.read() if p.poll() is not None else "")
        client = openai.OpenAI(base_url=m.group(1), api_key="EMPTY", max_retries=0, timeout=120)
        assert [x.id for x in client.models.list().data] == ["tiny"]
        r = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Say hi."}],
                                           max_tokens=8, temperature=0)
        assert r.choices[0].message.content and 0 < r.usage.completion_tokens <= 8
        long: list = []

        def ask_long():
            try:
                client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Say hi."}],
                                               max_tokens=7000, temperature=0, extra_body={"ignore_eos": True})
            except openai.APIError as e:  # 503, or the connection closed: an answer, not a hang
                long.append(e)

        asker = threading.Thread(target=ask_long, daemon=True)
        asker.start()
        health = m.group(1).removesuffix("/v1") + "/health"
        deadline = time.monotonic() + 60
        while not json.loads(urllib.request.urlopen(health, timeout=30).read())["generating"]:
            assert time.monotonic() < deadline, "the long request did not start"
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)  # while it generates
        rc, err = p.wait(timeout=60), p.stderr.read()
        assert rc == 0 and "stopped" in err, err[-3000:]
        asker.join(60)
        assert not asker.is_alive() and len(long) == 1
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
