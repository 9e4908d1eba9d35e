"""Checkpoints as the current ecosystem writes them (transformers 5), as older ones are (the
committed demo model was saved by transformers 4.57), and tokenizer folders that cannot load."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tokenmill import LLM, SamplingParams
from tokenmill.tokenizer import chat_template_ids

DEMO = Path(__file__).resolve().parents[1] / "tokenmill" / "demo_model"
GREEDY = SamplingParams(temperature=0, max_tokens=12)


@pytest.fixture(scope="module")
def demo_saved_by_transformers_5(tmp_path_factory) -> Path:
    """The demo model re-saved the 5.x way (as GPTQModel does when it writes a model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("demo-tf5")
    AutoTokenizer.from_pretrained(DEMO).save_pretrained(out)
    AutoModelForCausalLM.from_pretrained(DEMO).save_pretrained(out)
    return out


def test_a_folder_saved_by_transformers_5_serves_like_one_saved_by_4(demo_saved_by_transformers_5):
    folder = demo_saved_by_transformers_5
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert isinstance(config["extra_special_tokens"], list)  # the 5.x layout that 4.x could not read
    assert json.loads((folder / "config.json").read_text())["transformers_version"].startswith("5.")
    assert json.loads((DEMO / "config.json").read_text())["transformers_version"].startswith("4.")
    new, old = LLM(str(folder)), LLM(str(DEMO))
    prompts = ["The Python interpreter", "A list is"]
    for a, b in zip(new.generate(prompts, GREEDY, use_tqdm=False), old.generate(prompts, GREEDY, use_tqdm=False)):
        assert a.prompt_token_ids == b.prompt_token_ids and a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].text == b.outputs[0].text
    chat = [{"role": "user", "content": "What is a tuple?"}]
    assert chat_template_ids(new.get_tokenizer(), chat) == chat_template_ids(old.get_tokenizer(), chat)


@pytest.mark.parametrize("file,field,value,expected", [
    ("tokenizer_config.json", "extra_special_tokens", 5, "tokenizer_config.json: field 'extra_special_tokens'"),
    ("tokenizer_config.json", "added_tokens_decoder", [1, 2], "tokenizer_config.json: field 'added_tokens_decoder'"),
    ("tokenizer_config.json", "eos_token", {"text": "<|end|>"}, "tokenizer_config.json: field 'eos_token'"),
    ("tokenizer.json", None, "{not json", "tokenizer.json is not valid JSON"),
])
def test_a_tokenizer_that_cannot_load_names_the_file_and_field(tmp_path, file, field, value, expected):
    folder = tmp_path / "ckpt"
    shutil.copytree(DEMO, folder)
    path = folder / file
    if field is None:
        path.write_text(value)
    else:
        data = json.loads(path.read_text())
        data[field] = value
        path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="cannot load the tokenizer") as exc:
        LLM(str(folder))
    assert expected in str(exc.value)
    LLM(str(folder), skip_tokenizer_init=True)  # the model itself still loads on token ids
