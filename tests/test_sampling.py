"""Sampling: seeds, filters and penalties against small reference computations, stop rules, n > 1."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import hf_greedy, random_prompts
from tokenmill import LLM, SamplingParams
from tokenmill.layers.sampler import Sampler, apply_penalties, apply_top_k_top_p_min_p


@pytest.fixture(scope="module")
def llm_and_hf(make_checkpoint):
    path, hf = make_checkpoint("LlamaForCausalLM", seed=5)
    return LLM(path, dtype="float32"), hf


def _gen(llm, prompts, params):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def test_seed_reproducible_whatever_the_batch(llm_and_hf):
    llm, _ = llm_and_hf
    prompts = random_prompts([12, 30, 7, 50], seed=2)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    alone = _gen(llm, [prompts[0]], seeded)[0].outputs[0].token_ids
    mates = [SamplingParams(temperature=1.0, max_tokens=n, ignore_eos=True) for n in (5, 20, 9)]
    crowded = _gen(llm, prompts, [seeded] + mates)[0].outputs[0].token_ids
    assert alone == crowded
    other_seed = _gen(llm, [prompts[0]], SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=16,
                                                        ignore_eos=True))[0].outputs[0].token_ids
    assert other_seed != alone


def test_top_k_1_equals_greedy(llm_and_hf):
    llm, hf = llm_and_hf
    prompts = random_prompts([9, 21], seed=4)
    outs = _gen(llm, prompts, SamplingParams(temperature=1.5, top_k=1, max_tokens=10, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(hf, p, 10) for p in prompts]


def test_n_greater_than_one(llm_and_hf):
    llm, hf = llm_and_hf
    p = random_prompts([15], seed=8)[0]
    greedy = _gen(llm, [p], SamplingParams(n=3, temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert [c.index for c in greedy.outputs] == [0, 1, 2]
    assert all(c.token_ids == hf_greedy(hf, p, 8) for c in greedy.outputs)
    sampled = _gen(llm, [p], SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=12, ignore_eos=True))[0]
    assert len({tuple(c.token_ids) for c in sampled.outputs}) > 1
    assert llm.llm_engine.block_manager.num_free_blocks == llm.llm_engine.block_manager.num_blocks


def test_logprobs_of_generated_tokens(llm_and_hf):
    llm, hf = llm_and_hf
    p = random_prompts([10], seed=9)[0]
    out = _gen(llm, [p], SamplingParams(temperature=0, max_tokens=3, logprobs=5, ignore_eos=True))[0].outputs[0]
    with torch.inference_mode():
        ref = hf(torch.tensor([p + out.token_ids])).logits[0].float().log_softmax(-1)
    for i, (tid, d) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[len(p) - 1 + i]
        assert d[tid].rank == 1 and abs(d[tid].logprob - row[tid].item()) < 1e-4
        top5 = row.topk(5).indices.tolist()
        assert set(top5) <= set(d) and len(d) == 5
        assert [d[t].rank for t in top5] == [1, 2, 3, 4, 5]
    assert out.cumulative_logprob == pytest.approx(sum(d[t].logprob for t, d in zip(out.token_ids, out.logprobs)))


def test_min_tokens_and_stop_token_ids(llm_and_hf):
    llm, hf = llm_and_hf
    p = random_prompts([10], seed=10)[0]
    greedy = hf_greedy(hf, p, 10)
    stop_tok = greedy[3]
    out = _gen(llm, [p], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_tok]))[0].outputs[0]
    first = greedy.index(stop_tok)
    assert out.token_ids == greedy[:first + 1] and out.finish_reason == "stop" and out.stop_reason == stop_tok
    # min_tokens bans the stop token until enough tokens exist, so the path changes.
    out = _gen(llm, [p], SamplingParams(temperature=0, max_tokens=10, min_tokens=first + 2,
                                        stop_token_ids=[stop_tok]))[0].outputs[0]
    assert len(out.token_ids) >= first + 2 and stop_tok not in out.token_ids[:first + 1]


def test_stop_strings_cut_from_text(llm_and_hf):
    llm, _ = llm_and_hf
    tok = llm.get_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    full = llm.generate("The function returns", params, use_tqdm=False)[0].outputs[0]
    assert full.text == tok.decode(full.token_ids, skip_special_tokens=True)
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 2]
    cut = full.text.find(stop)
    out = llm.generate("The function returns", SamplingParams(temperature=0, max_tokens=24, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.text == full.text[:cut] and out.finish_reason == "stop" and out.stop_reason == stop
    inc = llm.generate("The function returns", SamplingParams(temperature=0, max_tokens=24, stop=stop,
                                                              include_stop_str_in_output=True), use_tqdm=False)
    assert inc[0].outputs[0].text == full.text[:cut + len(stop)]


def test_sampler_matches_softmax_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]])
    sampler = Sampler()
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(5)
    params = [SamplingParams(temperature=0.7)]
    for _ in range(4000):
        tok = sampler(logits.clone(), params, [[]], [[]], [None], [[]], g).token_ids[0]
        counts[tok] += 1
    expected = (logits[0] / 0.7).softmax(-1)
    assert torch.allclose(counts / counts.sum(), expected, atol=0.025)


def test_top_k_top_p_min_p_against_reference():
    torch.manual_seed(0)
    logits = torch.randn(4, 50)
    top_k = torch.tensor([0, 5, 0, 3])
    top_p = torch.tensor([1.0, 1.0, 0.6, 0.9])
    min_p = torch.tensor([0.0, 0.0, 0.0, 0.0])
    out = apply_top_k_top_p_min_p(logits.clone(), top_k, top_p, min_p)
    for i in range(4):
        probs = logits[i].softmax(-1)
        order = probs.argsort(descending=True).tolist()
        keep = set(order[: int(top_k[i]) or 50])
        mass, nucleus = 0.0, set()
        for t in order:  # smallest set, in rank order, whose mass reaches top_p
            if t not in keep:
                break
            nucleus.add(t)
            mass += probs[t].item() / sum(probs[j].item() for j in keep)
            if mass >= top_p[i].item():
                break
        assert {t for t in range(50) if out[i, t] > float("-inf")} == nucleus
    out = apply_top_k_top_p_min_p(logits.clone(), torch.zeros(4, dtype=torch.long), torch.ones(4),
                                  torch.tensor([0.0, 0.1, 0.5, 1.0]))
    for i, mp in enumerate([0.0, 0.1, 0.5, 1.0]):
        probs = logits[i].softmax(-1)
        assert torch.equal(out[i] > float("-inf"), probs >= mp * probs.max())


def test_penalties_against_reference():
    logits = torch.tensor([[1.0, -2.0, 0.5, 3.0, -0.5, 0.0]])
    prompt, output = [0, 1], [3, 3, 4]
    p = SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    got = apply_penalties(logits.clone(), [prompt], [output], [p])[0]
    ref = logits[0].clone()
    for t in set(prompt + output):  # HF repetition penalty on prompt and output tokens
        ref[t] = ref[t] / 2.0 if ref[t] > 0 else ref[t] * 2.0
    for t in set(output):  # OpenAI presence/frequency on output tokens
        ref[t] -= 0.5 + 0.25 * output.count(t)
    assert torch.allclose(got, ref)
