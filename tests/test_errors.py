"""Bad input gets a ValueError (or CLI exit code 2) naming the problem; running work carries on."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.conftest import hf_greedy, random_prompts
from tokenmill import LLM, SamplingParams


def test_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        LLM(str(tmp_path / "nope"))


def test_unsupported_architecture(make_checkpoint, tmp_path):
    path, _ = make_checkpoint("LlamaForCausalLM")
    d = tmp_path / "bad"
    shutil.copytree(path, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["FalconForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unsupported architecture 'FalconForCausalLM'"):
        LLM(str(d))


def test_folder_without_weights(make_checkpoint, tmp_path):
    path, _ = make_checkpoint("LlamaForCausalLM")
    d = tmp_path / "noweights"
    shutil.copytree(path, d)
    (d / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no weights"):
        LLM(str(d))


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-3), "top_k"), (dict(min_p=2), "min_p"), (dict(max_tokens=0), "max_tokens"),
    (dict(n=0), "n must"), (dict(repetition_penalty=0), "repetition_penalty"),
    (dict(presence_penalty=5), "presence_penalty"), (dict(min_tokens=9, max_tokens=3), "min_tokens"),
    (dict(stop=[""]), "stop"), (dict(logprobs=-1), "logprobs"), (dict(seed="x"), "seed"),
])
def test_invalid_sampling_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingParams(**kwargs)


def test_bad_requests_refused_while_others_finish(make_checkpoint):
    path, hf = make_checkpoint("LlamaForCausalLM")
    llm = LLM(path, max_model_len=64)
    engine = llm.llm_engine
    p = random_prompts([10], seed=1)[0]
    sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    engine.add_request({"prompt_token_ids": p}, sp, request_id="good")
    engine.step()
    with pytest.raises(ValueError, match=r"max_model_len\) is 64"):
        engine.add_request({"prompt_token_ids": [5] * 80}, sp)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("", sp)
    with pytest.raises(ValueError, match=r"\[0, 512\)"):
        engine.add_request({"prompt_token_ids": [5, 9999]}, sp)
    with pytest.raises(ValueError, match="stop_token_ids"):
        engine.add_request({"prompt_token_ids": p}, SamplingParams(min_tokens=2, stop_token_ids=[999999]))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request({"prompt_token_ids": p}, sp, request_id="good")
    with pytest.raises(ValueError, match="prompts"):
        llm.generate(["a", "b"], [sp])
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert done["good"].outputs[0].token_ids == hf_greedy(hf, p, 8)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    # A batch with one bad prompt is refused whole, before any work starts.
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate([{"prompt_token_ids": p}, {"prompt_token_ids": [5] * 80}], sp, use_tqdm=False)
    assert not engine.has_unfinished_requests()
    # Generation stops at max_model_len with finish_reason "length".
    out = llm.generate({"prompt_token_ids": [5] * 60}, SamplingParams(temperature=0, max_tokens=None,
                                                                      ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 4 and out.outputs[0].finish_reason == "length"


def test_max_model_len_over_model_limit(make_checkpoint):
    path, _ = make_checkpoint("LlamaForCausalLM")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        LLM(path, max_model_len=100000)


@pytest.mark.parametrize("args,match", [
    (["generate", "/definitely/not/here"], "model folder not found"),
    (["generate", "--temperature", "-2"], "temperature"),
])
def test_cli_errors_exit_2(args, match):
    r = subprocess.run([sys.executable, "-m", "tokenmill.cli", *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert match in r.stderr
