"""The bundled demo model: same greedy text in tokenmill and transformers; the CLI streams it."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tokenmill import LLM, SamplingParams
from tokenmill.cli import DEMO_MODEL

PROMPTS = ["The Python interpreter", "A list is", "def main():\n    ", "Exceptions are raised when"]


@pytest.fixture(scope="module")
def demo_llm():
    return LLM(DEMO_MODEL)


def test_demo_greedy_text_matches_transformers(demo_llm):
    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    hf = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()
    outs = demo_llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)
    for prompt, out in zip(PROMPTS, outs):
        ids = tok(prompt, return_tensors="pt")
        with torch.inference_mode():
            ref = hf.generate(**ids, max_new_tokens=24, do_sample=False, pad_token_id=tok.pad_token_id)
        ref_ids = ref[0, ids.input_ids.shape[1]:].tolist()
        if tok.eos_token_id in ref_ids:  # transformers keeps the EOS token; so does tokenmill
            ref_ids = ref_ids[:ref_ids.index(tok.eos_token_id) + 1]
        assert out.outputs[0].token_ids == ref_ids
        assert out.outputs[0].text == tok.decode(ref_ids, skip_special_tokens=True)


def test_demo_chat_template(demo_llm):
    out = demo_llm.chat([{"role": "user", "content": "What is a dictionary?"}],
                        SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0]
    tok = demo_llm.get_tokenizer()
    expected = tok.apply_chat_template([{"role": "user", "content": "What is a dictionary?"}],
                                       add_generation_prompt=True)
    assert out.prompt_token_ids == list(expected)
    assert out.outputs[0].token_ids


def test_cli_generate_streams_demo_model():
    r = subprocess.run([sys.executable, "-m", "tokenmill.cli", "generate", "--prompt", "The Python interpreter",
                        "--temperature", "0", "--max-tokens", "16"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    llm_text = LLM(DEMO_MODEL).generate("The Python interpreter", SamplingParams(temperature=0, max_tokens=16),
                                        use_tqdm=False)[0].outputs[0].text
    assert r.stdout.strip() == llm_text.strip()
