"""Token-exact greedy generation and prompt logprobs against transformers, per architecture."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import hf_greedy, hf_prompt_logprobs, random_prompts
from tokenmill import LLM, SamplingParams

LENGTHS = [1, 3, 7, 16, 17, 33, 48, 90]  # 8 prompts: under, at and over block boundaries
NEW_TOKENS = 10

CASES = {
    "llama-mha-untied": ("LlamaForCausalLM", dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "llama-gqa2-tied": ("LlamaForCausalLM", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "llama-mqa-theta": ("LlamaForCausalLM", dict(num_key_value_heads=1, rope_theta=500000.0)),
    "llama-rope-linear": ("LlamaForCausalLM", dict(rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "llama-rope-llama3": ("LlamaForCausalLM", dict(rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}, rope_theta=500000.0)),
    "llama-bias-headdim": ("LlamaForCausalLM", dict(attention_bias=True, mlp_bias=True, head_dim=24)),
    "mistral-window8": ("MistralForCausalLM", dict(sliding_window=8, tie_word_embeddings=False)),
    "qwen2-tied": ("Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen2-window": ("Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=12,
                                              max_window_layers=1, num_hidden_layers=3)),
    "gpt2": ("GPT2LMHeadModel", dict(n_inner=128)),
    "opt-pre-ln": ("OPTForCausalLM", dict(ffn_dim=128)),
    "opt-post-ln-project": ("OPTForCausalLM", dict(ffn_dim=128, do_layer_norm_before=False, word_embed_proj_dim=32)),
    "bloom": ("BloomForCausalLM", dict()),
    "bloom-6-heads": ("BloomForCausalLM", dict(hidden_size=96, num_attention_heads=6)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_matches_transformers(make_checkpoint, case):
    arch, overrides = CASES[case]
    path, hf = make_checkpoint(arch, **overrides)
    prompts = random_prompts(LENGTHS, seed=len(case))
    expected = [hf_greedy(hf, p, NEW_TOKENS) for p in prompts]
    llm = LLM(path, dtype="float32", max_num_batched_tokens=128)
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, prompt_logprobs=0)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for p, out, exp in zip(prompts, outs, expected):
        assert out.outputs[0].token_ids == exp, f"prompt of {len(p)} tokens diverged"
        assert out.outputs[0].finish_reason == "length"
        # prompt logprobs: entry 0 is None; entry i is log p(prompt[i] | prompt[:i]).
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(p)
        if len(p) > 1:
            got = torch.tensor([d[t].logprob for d, t in zip(out.prompt_logprobs[1:], p[1:])])
            torch.testing.assert_close(got, hf_prompt_logprobs(hf, p), atol=1e-4, rtol=1e-4)
    assert llm.llm_engine.block_manager.num_free_blocks == llm.llm_engine.block_manager.num_blocks


def test_bfloat16_runs_close_to_reference(make_checkpoint):
    """In bfloat16 exact tokens are not promised; logprobs stay close to the float32 reference."""
    path, hf = make_checkpoint("LlamaForCausalLM")
    prompt = random_prompts([40], seed=3)[0]
    llm = LLM(path, dtype="bfloat16")
    out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=0),
                       use_tqdm=False)[0]
    got = torch.tensor([d[t].logprob for d, t in zip(out.prompt_logprobs[1:], prompt[1:])])
    torch.testing.assert_close(got, hf_prompt_logprobs(hf, prompt), atol=0.15, rtol=0.05)


def test_sharded_safetensors_and_bin(make_checkpoint, tmp_path):
    """Sharded safetensors with an index, and pytorch_model.bin (as older checkpoints hold it;
    transformers 5 writes only safetensors), load to the same outputs."""
    _, hf = make_checkpoint("LlamaForCausalLM", seed=7)
    prompt = random_prompts([20], seed=1)[0]
    exp = hf_greedy(hf, prompt, 6)
    for name in ("sharded", "bin"):
        d = tmp_path / name
        if name == "sharded":
            hf.save_pretrained(d, max_shard_size="50KB")
        else:
            d.mkdir()
            hf.config.save_pretrained(d)
            torch.save(hf.state_dict(), d / "pytorch_model.bin")
        files = {p.name for p in d.iterdir()}
        assert ("model.safetensors.index.json" in files) if name == "sharded" else ("pytorch_model.bin" in files)
        llm = LLM(str(d), skip_tokenizer_init=True)
        out = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                           use_tqdm=False)[0]
        assert out.outputs[0].token_ids == exp


def test_bloom_7b1_real_config_builds():
    """The article's model: its real config.json loads and builds (on meta: no memory, no weights)."""
    from pathlib import Path

    from tokenmill.config import ModelConfig
    from tokenmill.models.registry import get_model_class

    cfg = ModelConfig(str(Path(__file__).parent / "data" / "bloom-7b1"), device="cpu")
    with torch.device("meta"):
        model = get_model_class(cfg.hf_config.architectures)(cfg.hf_config, torch.float16)
    model.tie_weights()
    assert sum(p.numel() for p in model.parameters()) == 7_069_016_064
    assert len(model.transformer.h) == 30 and model.transformer.h[0].self_attention.num_heads == 32
