"""model_folder.tokenizer.Tokenizer gives what transformers' AutoTokenizer gives for the same folder."""

from __future__ import annotations

import json

import jinja2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from model_folder.errors import ModelFolderError
from model_folder.tokenizer import Tokenizer
from model_shards.make_model import make_model

SAMPLES = ["Hello world", "東京 😀 naïve café", "<|eot_id|> after a special token", "  spaces\n\ttabs  ", ""]
CHAT = [
    {"role": "system", "content": "Be brief.  "},
    {"role": "user", "content": "What is 東京?"},
    {"role": "assistant", "content": "A city."},
    {"role": "user", "content": "And 😀?"},
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def ours(folder):
    return Tokenizer.from_folder(folder)


@pytest.fixture(scope="module")
def reference(folder):
    return AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("text", SAMPLES)
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_matches_transformers(ours, reference, text, add_special_tokens):
    assert ours.encode(text, add_special_tokens) == reference.encode(text, add_special_tokens=add_special_tokens)


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=40))
def test_encode_and_decode_match_transformers_on_any_text(ours, reference, text):
    ids = ours.encode(text)
    assert ids == reference.encode(text)
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)


@settings(max_examples=60, deadline=None)
@given(ids=st.lists(st.integers(0, 1023), max_size=24))
def test_decode_of_arbitrary_ids_matches_transformers(ours, reference, ids):
    for skip in (True, False):
        assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(ours, reference, add_generation_prompt):
    expected = reference.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(CHAT, add_generation_prompt) == expected
    assert expected.startswith("<|begin_of_text|><|start_header_id|>system")


def test_chat_template_raise_exception_raises_a_template_error(ours):
    with pytest.raises(jinja2.TemplateError, match="Unknown role: robot"):
        ours.apply_chat_template([{"role": "robot", "content": "beep"}])


def test_special_ids_match_the_folder(ours, reference, folder):
    generation = json.loads((folder / "generation_config.json").read_text())
    assert ours.bos_token_id == reference.bos_token_id == ours.encode("x")[0]
    assert ours.eos_token_ids == tuple(generation["eos_token_id"])
    assert reference.eos_token_id in ours.eos_token_ids
    assert ours.vocab_size == len(reference) == 1024
    # transformers lists only the named special tokens; ours lists every token decode can skip.
    assert set(reference.all_special_ids) <= set(ours.all_special_ids)
    assert len(ours.all_special_ids) == 5


def test_missing_tokenizer_json_names_the_file(tmp_path):
    with pytest.raises(ModelFolderError, match="tokenizer.json"):
        Tokenizer.from_folder(tmp_path)


def test_bad_tokenizer_config_names_the_file(tmp_path):
    folder = make_model(tmp_path)
    (folder / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ModelFolderError, match="tokenizer_config.json"):
        Tokenizer.from_folder(folder)


def test_eos_ids_are_the_union_of_generation_config_and_tokenizer_config(tmp_path):
    folder = make_model(tmp_path)
    eot = Tokenizer.from_folder(folder).eos_token_ids[-1]
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert Tokenizer.from_folder(folder).eos_token_ids == (7, eot)


def test_template_features_render_as_in_transformers(tmp_path):
    """tojson, loop controls, {% generation %} and a chat_template.jinja file that wins over the config."""
    folder = make_model(tmp_path)
    template = (
        "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}"
        "{% generation %}{{ m | tojson }}{% endgeneration %}\n{% endfor %}{{ eos_token }}"
    )
    (folder / "chat_template.jinja").write_text(template)
    expected = AutoTokenizer.from_pretrained(folder).apply_chat_template(CHAT, tokenize=False)
    assert Tokenizer.from_folder(folder).apply_chat_template(CHAT, add_generation_prompt=False) == expected
    assert 'What is 東京?"}' in expected and "system" not in expected


def test_a_deepseek_folder_without_a_template_renders_deepseeks_chat_format(tmp_path):
    """V3.2 / V4 folders ship encoding/*.py instead of a chat_template: their role tokens in the
    vocabulary select DeepSeek's non-thinking chat format (model_folder/deepseek_chat_format.py)."""
    from tokenizers import AddedToken

    folder = make_model(tmp_path)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert Tokenizer.from_folder(folder).chat_template is None  # no role tokens: still no template
    tokenizer = Tokenizer.from_folder(folder)
    tokenizer.backend.add_special_tokens([AddedToken(t, special=True) for t in ("<｜User｜>", "<｜Assistant｜>")])
    tokenizer.backend.save(str(folder / "tokenizer.json"))
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"},
            {"role": "assistant", "content": "Hi!"}, {"role": "user", "content": "1+1=?"}]
    rendered = Tokenizer.from_folder(folder).apply_chat_template(chat)
    bos = tokenizer.special_tokens["bos_token"]
    assert rendered == (f"{bos}Be brief.<｜User｜>hello<｜Assistant｜></think>Hi!<｜end▁of▁sentence｜>"
                        "<｜User｜>1+1=?<｜Assistant｜></think>")
