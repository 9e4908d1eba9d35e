"""Prefix caching end to end: identical outputs on/off/spill, multi-turn hits, invariants."""
from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import random_prompts
from tokenmill import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def ckpt(make_checkpoint):
    return make_checkpoint("LlamaForCausalLM", seed=21)[0]


def mixed_workload() -> list[list[int]]:
    """Shared system prompts, multi-turn style extensions, and unrelated prompts."""
    system_a, system_b = random_prompts([40, 23], seed=31)
    tails = random_prompts([5, 17, 30, 3, 44, 12], seed=32)
    convo = system_a + tails[1]
    return [system_a + tails[0], system_b + tails[1], convo, convo + tails[2], system_a + tails[3],
            tails[4], system_b + tails[5], convo + tails[2] + tails[0]]


def check_invariants(engine) -> None:
    """After everything finished: no block held, each block in one place, counts add up."""
    bm = engine.block_manager
    assert all(r == 0 for r in bm.ref_counts)
    assert sorted(bm.free_queue) == list(range(bm.num_blocks))  # every block free, exactly once
    for key, block in bm.cached.items():
        assert bm.contents[block] is not None and bm.contents[block].key == key
    assert sum(c is not None for c in bm.contents) == len(bm.cached)
    if bm.spill is not None:
        assert len(bm.spill.lru) + len(bm.spill.free) == bm.spill.num_blocks
        assert len(set(bm.spill.free)) == len(bm.spill.free) and not set(bm.spill.free) & set(bm.spill.lru)
        assert {bm.spill.lru[b].key: b for b in bm.spill.lru} == bm.spill.by_key
        assert not set(bm.spill.by_key) & set(bm.cached)  # a content lives in one tier
    assert not engine.scheduler.running and not engine.scheduler.waiting


def run(llm, prompts, params=GREEDY, one_by_one=True):
    if one_by_one:  # later prompts then find the earlier ones cached
        return [llm.generate({"prompt_token_ids": p}, params, use_tqdm=False)[0] for p in prompts]
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


def test_outputs_identical_on_off_and_spill(ckpt):
    prompts = mixed_workload()
    off = LLM(ckpt, skip_tokenizer_init=True, enable_prefix_caching=False, block_size=4)
    ref = [o.outputs[0].token_ids for o in run(off, prompts)]
    assert off.llm_engine.get_stats().prefix_cache_hits == 0
    configs = [dict(), dict(num_gpu_blocks_override=30), dict(num_gpu_blocks_override=30, swap_space=2**-10)]
    for kw in configs:
        llm = LLM(ckpt, skip_tokenizer_init=True, block_size=4, max_num_batched_tokens=24, **kw)
        assert [o.outputs[0].token_ids for o in run(llm, prompts)] == ref, kw
        assert [o.outputs[0].token_ids for o in run(llm, prompts, one_by_one=False)] == ref, kw
        stats = llm.llm_engine.get_stats()
        assert stats.prefix_cache_hits > 0
        if kw:
            assert stats.num_preemptions > 0 and stats.evictions > 0
        if "swap_space" in kw:
            assert stats.swaps_out > 0 and stats.swaps_in > 0
        check_invariants(llm.llm_engine)


def test_multi_turn_hits_cover_earlier_turns(ckpt):
    llm = LLM(ckpt, skip_tokenizer_init=True, block_size=8)
    engine = llm.llm_engine
    turns = random_prompts([30, 11, 25, 19], seed=40)
    history: list[int] = []
    for k, new in enumerate(turns):
        prompt = history + new
        before = engine.get_stats().prefix_cache_hits
        out = llm.generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False)[0]
        hits = engine.get_stats().prefix_cache_hits - before
        # Everything sent before (earlier turns and replies) is reused, to whole blocks.
        assert hits >= (len(history) // 8) * 8, f"turn {k}"
        history = prompt + out.outputs[0].token_ids
    check_invariants(engine)


def test_spill_tier_cuts_recomputation(ckpt):
    convos = random_prompts([60, 52, 70, 45], seed=50)
    results = {}
    for swap in (0, 2**-10):  # GiB: 1 MiB
        llm = LLM(ckpt, skip_tokenizer_init=True, block_size=4, num_gpu_blocks_override=40, swap_space=swap)
        for _round in range(2):
            for p in convos:
                run(llm, [p])
        results[swap] = llm.llm_engine.get_stats()
        check_invariants(llm.llm_engine)
    assert results[0].recomputed_tokens > 0
    assert results[2**-10].recomputed_tokens <= results[0].recomputed_tokens // 2
    assert results[2**-10].swaps_in > 0


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(["add", "add", "add", "step", "step", "abort"]),
                              st.integers(0, 1000)), min_size=5, max_size=40),
       spill=st.booleans())
def test_random_streams_keep_the_pool_consistent(ckpt, ops, spill):
    bases = random_prompts([12, 20, 7], seed=60)
    run_stream(_pool_llm(ckpt, spill).llm_engine, ops,
               lambda x: (bases[x % 3][: 4 + x % 16] + [5 + x % 50] * (x % 9),
                          SamplingParams(temperature=0, max_tokens=1 + x % 6, ignore_eos=True)))


def run_stream(engine, ops: list[tuple[str, int]], request_of) -> None:
    """Play hypothesis' ops (add: request_of(x) -> (prompt ids, params); step; abort a live
    request) to the end, then check the pool is whole again."""
    rng = random.Random(len(ops))
    live: list[str] = []
    for op, x in ops:
        if op == "add":
            prompt, params = request_of(x)
            live.append(engine.add_request({"prompt_token_ids": prompt}, params))
        elif op == "abort" and live:
            engine.abort_request(live.pop(rng.randrange(len(live))))
        else:
            engine.step()
    while engine.has_unfinished_requests():
        engine.step()
    check_invariants(engine)


_llms: dict = {}


def _pool_llm(ckpt, spill: bool) -> LLM:
    """One small-pool engine per spill setting, reused across examples (it must end clean anyway)."""
    if spill not in _llms:
        _llms[spill] = LLM(ckpt, skip_tokenizer_init=True, block_size=4, num_gpu_blocks_override=12,
                           max_num_batched_tokens=16, swap_space=2**-14 if spill else 0)
    return _llms[spill]


def test_constant_hash_end_to_end_stays_exact(ckpt):
    """Every block colliding on one key: verification turns each would-be hit into a miss."""
    prompts = mixed_workload()
    ref_llm = LLM(ckpt, skip_tokenizer_init=True, enable_prefix_caching=False, block_size=4)
    ref = [o.outputs[0].token_ids for o in run(ref_llm, prompts)]
    llm = LLM(ckpt, skip_tokenizer_init=True, block_size=4)
    llm.llm_engine.block_manager.hash_fn = lambda parent, tokens: 7
    assert [o.outputs[0].token_ids for o in run(llm, prompts)] == ref
    check_invariants(llm.llm_engine)


def test_prompt_logprobs_complete_despite_a_cached_prefix(ckpt):
    llm = LLM(ckpt, skip_tokenizer_init=True, block_size=4)
    prompt = random_prompts([20], seed=70)[0]
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1)
    first = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    second = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0]
    assert len(first.prompt_logprobs) == len(second.prompt_logprobs) == 20
    assert [d[t].logprob for d, t in zip(second.prompt_logprobs[1:], prompt[1:])] == pytest.approx(
        [d[t].logprob for d, t in zip(first.prompt_logprobs[1:], prompt[1:])], abs=1e-5)
    # Without prompt logprobs the same prompt hits the cache.
    before = llm.llm_engine.get_stats().prefix_cache_hits
    llm.generate({"prompt_token_ids": prompt}, GREEDY, use_tqdm=False)
    assert llm.llm_engine.get_stats().prefix_cache_hits > before
