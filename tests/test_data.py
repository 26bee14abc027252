"""lwlib.data's one grammar of Hugging Face data sets in profiles, ``hf:<id>[:<config>][@<split>]``, and its
errors naming the profile field (the benchmark files themselves: test_bench.py, test_probe.py, test_faults.py)."""

from __future__ import annotations

import pytest

from lwlib.data import HFSpec, is_hf_spec, parse_hf_spec


@pytest.mark.parametrize("spec,want", [
    ("hf:THUDM/LongWriter-6k", HFSpec("THUDM/LongWriter-6k", None, "train")),
    ("hf:HuggingFaceH4/ultrachat_200k@train_sft", HFSpec("HuggingFaceH4/ultrachat_200k", None, "train_sft")),
    ("hf:org/set:cfg", HFSpec("org/set", "cfg", "train")),
    ("hf:org/set:cfg@test", HFSpec("org/set", "cfg", "test")),
    ("hf:org/set@train[:100]", HFSpec("org/set", None, "train[:100]")),  # datasets' slice syntax in the split
])
def test_parse_hf_spec(spec, want):
    assert is_hf_spec(spec) and parse_hf_spec(spec, "sft.general_data") == want


@pytest.mark.parametrize("spec,why", [
    ("THUDM/LongWriter-6k", "does not start with 'hf:'"),
    ("hf:", "no data set id"),
    ("hf::cfg", "no data set id"),
    ("hf:org/set:", "empty config"),
    ("hf:org/set@", "empty split"),
    ("hf:org/set:a:b", "more than one ':'"),
    ("hf:org/set@a@b", "more than one '@'"),
    ("hf:org/set @train", "whitespace"),
])
def test_malformed_hf_spec_names_the_field(spec, why):
    with pytest.raises(ValueError) as e:
        parse_hf_spec(spec, "dpo.general_data")
    msg = str(e.value)
    assert msg.startswith(f"dpo.general_data: {spec!r} ") and why in msg and "hf:<id>[:<config>][@<split>]" in msg


def test_default_split_and_not_a_spec():
    assert parse_hf_spec("hf:a/b", "x", default_split="validation").split == "validation"
    assert not is_hf_spec("data/pairs.jsonl") and not is_hf_spec(None)


def test_sft_hugging_face_data_use_the_same_grammar():
    from lwlib.sft import load_hf_messages

    with pytest.raises(ValueError, match=r"^sft\.general_data: 'hf:org/set:' .*empty config"):
        load_hf_messages("hf:org/set:", field="sft.general_data")
