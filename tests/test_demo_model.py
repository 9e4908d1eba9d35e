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
                                       add_generation_prompt=True, return_dict=False)
    assert out.prompt_token_ids == list(expected)
    assert out.outputs[0].token_ids


def test_cli_generate_streams_demo_model():
    r = subprocess.run([sys.executable, "-m", "tokenmill.cli", "generate", "--prompt", "The Python interpreter",
                        "--temperature", "0", "--max-tokens", "16"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    llm_text = LLM(DEMO_MODEL).generate("The Python interpreter", SamplingParams(temperature=0, max_tokens=16),
                                        use_tqdm=False)[0].outputs[0].text
    assert r.stdout.strip() == llm_text.strip()


def test_output_kinds_carry_the_same_completion():
    """DELTA pieces add up to the CUMULATIVE output; FINAL_ONLY yields only the finished one."""
    from tokenmill.cli import DEMO_MODEL
    from tokenmill.sampling_params import RequestOutputKind

    llm = LLM(DEMO_MODEL, dtype="float32")
    engine = llm.llm_engine
    base = dict(temperature=0.8, seed=3, max_tokens=40, n=2, logprobs=2, stop=["\n\n"])
    per_kind = {}
    for kind in RequestOutputKind:
        rid = engine.add_request("def add(a, b):", SamplingParams(output_kind=kind, **base))
        seen = []
        while engine.has_unfinished_requests():
            seen += [o for o in engine.step() if o.request_id == rid]
        per_kind[kind] = seen
    final = per_kind[RequestOutputKind.CUMULATIVE][-1]
    assert len(per_kind[RequestOutputKind.FINAL_ONLY]) == 1 and per_kind[RequestOutputKind.FINAL_ONLY][0].finished
    for c_final, c_only in zip(final.outputs, per_kind[RequestOutputKind.FINAL_ONLY][0].outputs):
        assert (c_only.text, c_only.token_ids) == (c_final.text, c_final.token_ids)
    for i, c_final in enumerate(final.outputs):
        pieces = [o.outputs[i] for o in per_kind[RequestOutputKind.DELTA]]
        assert "".join(p.text for p in pieces) == c_final.text
        assert [t for p in pieces for t in p.token_ids] == c_final.token_ids
        assert [lp for p in pieces for lp in p.logprobs] == c_final.logprobs
        assert pieces[-1].finish_reason == c_final.finish_reason
