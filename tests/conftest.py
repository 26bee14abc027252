"""Shared fixtures: the real bundled model (loaded once per session) and a loopback OpenAI server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"
if SHARED_DATA.exists():
    os.environ.setdefault("LWLIB_DATA_DIR", str(SHARED_DATA))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not os.path.exists("/dev/nvidiactl"):  # no CUDA: Triton kernels (lwlib.decode_attention) run in its interpreter,
    os.environ.setdefault("TRITON_INTERPRET", "1")  # which must be chosen before triton is imported

MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def model_and_tok():
    """(model, tokenizer) of the bundled SmolLM2-135M-Instruct, fp32 on CPU. Do not train it in place:
    copy it (``copy.deepcopy``) or load a fresh one for tests that change weights."""
    from lwlib.models import load_model

    return load_model(MODEL, device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def local_backend(model_and_tok):
    from lwlib.backends import LocalBackend

    model, tok = model_and_tok
    return LocalBackend(model, tok, batch_size=4, name=MODEL)


@pytest.fixture(scope="session")
def chat_server(local_backend):
    """An OpenAI-compatible server on 127.0.0.1 answering with the bundled model."""
    from lwlib.serve import serve

    with serve(local_backend, model_name=MODEL) as server:
        yield server
