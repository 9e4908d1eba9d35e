"""Speculative decoding: greedy outputs identical to transformers' with proposals on, the
rejection sampler's output distribution equal to the target's, the KV pool clean after
rejections, and what each request feature does with proposals."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import hf_greedy, random_prompts
from tests.test_prefix_caching import check_invariants, run_stream
from tokenmill import LLM, SamplingParams
from tokenmill.spec_decode.config import SpeculativeConfig
from tokenmill.spec_decode.draft_model import draft_cost
from tokenmill.spec_decode.ngram import NgramProposer
from tokenmill.spec_decode.rejection import Draft, accept_drafts

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
NEW = 24


def repetitive_prompts(seed: int) -> list[list[int]]:
    """Prompts that repeat themselves, as edited or quoted text does, so lookups find matches."""
    parts = random_prompts([7, 12, 5, 9, 16, 4], seed=seed)
    return [parts[0] * 3, parts[1] + parts[2] + parts[1], parts[3] * 4 + parts[4], parts[5] * 6, parts[4] * 2,
            parts[2] + parts[3] * 2 + parts[2]]


def spec_stats(llm: LLM):
    return llm.llm_engine.get_stats().spec_decode


def test_config_follows_vllm_names_and_refuses_what_it_does_not_know():
    c = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 3}')
    assert (c.prompt_lookup_min, c.prompt_lookup_max) == (3, 3)
    assert SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 2}).prompt_lookup_min == 5
    assert SpeculativeConfig.parse({"model": "/d", "num_speculative_tokens": 2}).method == "draft_model"
    for bad, match in ((["x"], "JSON object"), ("{", "JSON object"), ({"method": "ngram"}, "num_speculative_tokens"),
                       ({"method": "eagle", "num_speculative_tokens": 2}, "one of"),
                       ({"method": "ngram", "num_speculative_tokens": 0}, "1..16"),
                       ({"method": "ngram", "num_speculative_tokens": 2, "draft_tp": 1}, "unknown keys draft_tp"),
                       ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 4,
                         "prompt_lookup_max": 2}, "<="),
                       ({"num_speculative_tokens": 2}, "method")):
        with pytest.raises(ValueError, match=match):
            SpeculativeConfig.parse(bad)


def test_ngram_proposes_what_followed_the_latest_match():
    p = NgramProposer(1, 3)
    assert p.propose([1, 2, 3, 4, 9, 1, 2, 3], 3) == [4, 9, 1]
    assert p.propose([5, 6, 7, 1, 2, 8, 1, 2], 2) == [8, 1]  # the latest match of the longest suffix
    assert p.propose([1, 2, 3], 2) == []
    assert p.propose([7, 7, 7, 7], 3) == [7, 7, 7]
    assert NgramProposer(2, 2).propose([3, 1, 2, 3], 2) == []  # only a 1-token match exists


@pytest.mark.parametrize("arch,overrides", [
    ("LlamaForCausalLM", dict(num_key_value_heads=2)),  # RoPE, grouped KV heads
    ("MistralForCausalLM", dict(sliding_window=8)),  # the window cuts through proposals
    ("GPT2LMHeadModel", dict(n_inner=128)),  # learned positions
    # ALiBi. At 0.08 this Bloom repeats its last token for ever, so every proposal is accepted
    # and nothing is rolled back; at 0.15 its outputs move on and some proposals are rejected.
    ("BloomForCausalLM", dict(initializer_range=0.15)),
])
def test_greedy_is_identical_to_transformers_with_both_proposers(make_checkpoint, arch, overrides):
    """Through chunked prefill, an odd block size and preemption: proposals (n-gram, and a
    1-layer draft of the same architecture) are verified in the flat batch with the paged KV,
    and rejected ones leave nothing behind."""
    # A smaller init than the other tests': these weights echo their context often enough for
    # proposals to be accepted (at 0.2 nearly none are), and still leave no greedy ties.
    overrides = {"initializer_range": 0.08, **overrides}
    path, hf = make_checkpoint(arch, **overrides)
    draft, _ = make_checkpoint(arch, seed=7, **{**overrides, "num_hidden_layers": 1})
    prompts = repetitive_prompts(seed=3)
    expected = [hf_greedy(hf, p, NEW) for p in prompts]
    for config in (NGRAM, {"model": draft, "num_speculative_tokens": 3}):
        llm = LLM(path, skip_tokenizer_init=True, block_size=5, num_gpu_blocks_override=22, max_num_batched_tokens=20,
                  max_num_seqs=8, speculative_config=config)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True), use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected, config
        s = spec_stats(llm)
        assert s.num_drafts > 0, s
        # (A 1-layer draft may agree with its target on every token.)
        assert config is not NGRAM or 0 < s.num_accepted_tokens < s.num_draft_tokens, s
        assert llm.llm_engine.get_stats().num_preemptions > 0
        assert llm.llm_engine.get_stats().generation_tokens == NEW * len(prompts)
        check_invariants(llm.llm_engine)


def _trials(p: torch.Tensor, q, draft: list[int], n: int, seed: int, seeded: bool = False) -> list[list[int]]:
    """n verifications against target rows p ([k+1, V] probabilities) of `draft`, or, with
    draft distributions q ([k, V]), of proposals drawn from q as a draft model draws them. A
    proposed token p gives no mass to (as a grammar refuses it) is cut, as the verifier cuts it.
    seeded: each trial is a seeded request (its own generator; the coupling)."""
    params = SamplingParams(temperature=1.0)
    g = torch.Generator().manual_seed(seed)
    drafts = []
    for _ in range(n):
        own = torch.Generator().manual_seed(int(torch.randint(1 << 30, (), generator=g))) if seeded else None
        if q is None:
            drafts.append(Draft(draft, params, own))
            continue
        if seeded:  # the draft model draws from a copy of the request's generator
            copy = torch.Generator()
            copy.set_state(own.get_state())
            d = [int((q[i] / torch.empty(1, q.shape[1]).exponential_(generator=copy)[0]).argmax())
                 for i in range(q.shape[0])]
        else:
            d = torch.multinomial(q, 1, replacement=True, generator=g)[:, 0].tolist()
        kept = next((i for i, t in enumerate(d) if p[i, t] == 0), len(d))
        drafts.append(Draft(d[:kept], params, own, q[:kept], q[kept] if kept < len(d) else None))
    logits = torch.cat([p[:len(d.tokens) + 1].log() for d in drafts])  # k + 1 rows per draft
    return accept_drafts(logits, drafts, g)


def _chi2_ok(observed: torch.Tensor, expected_p: torch.Tensor) -> bool:
    """Pearson's test at p = 0.001 (Wilson-Hilferty for the chi-square quantile)."""
    n = float(observed.sum())
    exp = expected_p * n
    keep = exp > 5
    stat = float((((observed - exp) ** 2) / exp)[keep].sum())
    dof = int(keep.sum()) - 1
    z = 3.09
    limit = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    return stat < limit


@pytest.mark.parametrize("with_draft_probs", [False, True])
@pytest.mark.parametrize("seeded", [False, True])
@pytest.mark.parametrize("grammar", [False, True])
def test_rejection_sampling_keeps_the_target_distribution(with_draft_probs, seeded, grammar):
    """Whatever the proposal, the first emitted token follows p_0, and the second (after an
    accepted first) follows p_1: the output distribution is the target model's. Also for seeded
    requests (the coupling) and when a grammar refuses some tokens the draft likes (p is 0 on
    them; such a draft is cut and counts as rejected)."""
    V = 6
    g = torch.Generator().manual_seed(0)
    p = torch.rand(3, V, generator=g) ** 2 + 0.02
    if grammar:
        p[:, :2] = 0.0
    p /= p.sum(-1, keepdim=True)
    q = None
    draft = [2, 4]
    if with_draft_probs:
        q = torch.rand(2, V, generator=g) + 0.05
        if grammar:
            q[:, :2] += 0.5  # the draft favours what the grammar refuses
        q /= q.sum(-1, keepdim=True)
    n = 20000
    outs = _trials(p, q, draft, n, seed=1, seeded=seeded)
    first = torch.bincount(torch.tensor([o[0] for o in outs]), minlength=V).float()
    assert _chi2_ok(first, p[0]), (first / n, p[0])
    assert float(first[p[0] == 0].sum()) == 0
    # len > 1: the first proposal was accepted, so the second token was drawn after it.
    seconds = torch.bincount(torch.tensor([o[1] for o in outs if len(o) > 1]), minlength=V)
    assert _chi2_ok(seconds.float(), p[1]), (seconds / seconds.sum(), p[1])
    # A bad proposal (one the target never picks) is always rejected; a perfect one always kept.
    point = torch.zeros(3, V)
    point[:, 3] = 1.0
    assert all(o == [3] for o in _trials(point + 1e-12, None, [1, 1], 50, seed=2))
    assert all(o == [3, 3, 3] for o in _trials(point + 1e-12, None, [3, 3], 50, seed=3))


def test_features_with_proposals_match_plain_decoding(make_checkpoint):
    """Stop strings' token cousins (stop_token_ids), min_tokens, logprobs of the accepted tokens,
    n > 1 and seeded sampling: the same greedy tokens with proposals as without, seeds
    reproducible, and the KV pool clean."""
    path, _ = make_checkpoint("LlamaForCausalLM", num_key_value_heads=2, initializer_range=0.08)
    prompts = [{"prompt_token_ids": p} for p in repetitive_prompts(seed=5)]
    plain = LLM(path, skip_tokenizer_init=True, block_size=4, max_num_seqs=8)
    spec = LLM(path, skip_tokenizer_init=True, block_size=4, max_num_seqs=8, speculative_config=NGRAM)
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=2)
    ref = plain.generate(prompts, greedy, use_tqdm=False)
    got = spec.generate(prompts, greedy, use_tqdm=False)
    for r, o in zip(ref, got):
        assert o.outputs[0].token_ids == r.outputs[0].token_ids
        for a, b in zip(o.outputs[0].logprobs, r.outputs[0].logprobs):
            assert a.keys() == b.keys()
            assert all(abs(a[t].logprob - b[t].logprob) < 1e-4 and a[t].rank == b[t].rank for t in a)
    # A stop token the proposals would run past, held back by min_tokens for a while.
    stop = ref[0].outputs[0].token_ids[3]
    held = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, stop_token_ids=[stop], min_tokens=5)
    assert ([o.outputs[0].token_ids for o in spec.generate(prompts, held, use_tqdm=False)]
            == [o.outputs[0].token_ids for o in plain.generate(prompts, held, use_tqdm=False)])
    # A seeded request's tokens are its seed's, whatever the batch and whether a step speculated
    # for it: the same as without speculation (rejection.py, the coupling).
    seeded = SamplingParams(temperature=0.8, top_k=20, max_tokens=20, ignore_eos=True, seed=7, n=2)
    once = [c.token_ids for o in spec.generate(prompts, seeded, use_tqdm=False) for c in o.outputs]
    again = [c.token_ids for o in spec.generate(prompts[::-1], seeded, use_tqdm=False)[::-1] for c in o.outputs]
    alone = [c.token_ids for p in prompts for c in spec.generate(p, seeded, use_tqdm=False)[0].outputs]
    without = [c.token_ids for o in plain.generate(prompts, seeded, use_tqdm=False) for c in o.outputs]
    assert once == again == alone == without
    assert spec_stats(spec).num_accepted_tokens > 0
    check_invariants(spec.llm_engine)


_stream_llm: dict = {}


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(st.tuples(st.sampled_from(["add", "add", "step", "step", "step", "abort"]),
                              st.integers(0, 1000)), min_size=5, max_size=40))
def test_random_streams_with_proposals_keep_the_pool_consistent(make_checkpoint, ops):
    """The block manager's invariants through speculative steps, preemption and aborts."""
    if "llm" not in _stream_llm:
        path, _ = make_checkpoint("LlamaForCausalLM", seed=21, initializer_range=0.08)
        _stream_llm["llm"] = LLM(path, skip_tokenizer_init=True, block_size=4, num_gpu_blocks_override=14,
                                 max_num_batched_tokens=16, speculative_config=NGRAM)
    bases = repetitive_prompts(seed=60)
    run_stream(_stream_llm["llm"].llm_engine, ops,
               lambda x: (bases[x % len(bases)][: 4 + x % 20],
                          SamplingParams(temperature=0 if x % 2 else 1.0, max_tokens=1 + x % 9, ignore_eos=True)))


def test_draft_model_proposals_keep_greedy_exact_and_its_kv_in_step(make_checkpoint):
    """A draft checkpoint with the target's vocabulary: itself (every proposal accepted) and a
    smaller random one (most rejected, so its KV is rolled back every step), under preemption."""
    path, hf = make_checkpoint("LlamaForCausalLM", num_key_value_heads=2, initializer_range=0.08)
    small, _ = make_checkpoint("LlamaForCausalLM", seed=5, num_hidden_layers=1, hidden_size=32,
                               num_attention_heads=2, num_key_value_heads=1, initializer_range=0.08)
    prompts = repetitive_prompts(seed=3)
    expected = [hf_greedy(hf, p, NEW) for p in prompts]
    greedy = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    for draft, everything_accepted in ((path, True), (small, False)):
        llm = LLM(path, skip_tokenizer_init=True, block_size=5, num_gpu_blocks_override=22, max_num_batched_tokens=20,
                  max_num_seqs=8, speculative_config={"model": draft, "num_speculative_tokens": 3})
        runner, sizes = llm.llm_engine.speculator.draft.runner, []
        forward = runner.forward
        runner.forward = lambda sched: sizes.append(sched.num_batched_tokens) or forward(sched)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], greedy, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == expected, draft
        # New mirrors catch up on whole prompts, in chunks no larger than a target step.
        assert sizes and max(sizes) <= 20 and sum(sizes) > 20 * 3, sizes
        s = spec_stats(llm)
        assert s.num_drafts > 0
        if everything_accepted:
            assert s.num_accepted_tokens == s.num_draft_tokens, s
        else:
            assert s.num_accepted_tokens < s.num_draft_tokens
        check_invariants(llm.llm_engine)
        proposer = llm.llm_engine.speculator.draft
        assert not proposer.mirrors and all(r == 0 for r in proposer.block_manager.ref_counts)
    # Seeded sampling: the same tokens as without speculation, in a batch or alone.
    sampled = SamplingParams(temperature=0.9, max_tokens=NEW, ignore_eos=True, seed=3)
    plain = LLM(path, skip_tokenizer_init=True, block_size=5)
    without = [o.outputs[0].token_ids for o in plain.generate([{"prompt_token_ids": p} for p in prompts], sampled,
                                                              use_tqdm=False)]
    drafts_before = spec_stats(llm).num_drafts
    batched = [o.outputs[0].token_ids for o in llm.generate([{"prompt_token_ids": p} for p in prompts], sampled,
                                                            use_tqdm=False)]
    alone = [llm.generate({"prompt_token_ids": p}, sampled, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    assert batched == alone == without
    assert spec_stats(llm).num_drafts > drafts_before


def test_draft_model_must_share_the_vocabulary(make_checkpoint):
    path, _ = make_checkpoint("LlamaForCausalLM", num_key_value_heads=2, initializer_range=0.08)
    other, _ = make_checkpoint("LlamaForCausalLM", vocab_size=300, num_hidden_layers=1)
    with pytest.raises(ValueError, match="vocabulary"):
        LLM(path, skip_tokenizer_init=True, speculative_config={"model": other, "num_speculative_tokens": 2})


def test_draft_models_kv_comes_out_of_the_targets_budget(make_checkpoint):
    """kv_cache_memory_bytes holds both pools: with a draft, each target block pays for its twin
    in the draft's pool too, so the target gets fewer blocks and the sum stays in the budget."""
    path, _ = make_checkpoint("LlamaForCausalLM", num_key_value_heads=2, initializer_range=0.08)
    small, _ = make_checkpoint("LlamaForCausalLM", seed=5, num_hidden_layers=1, hidden_size=32,
                               num_attention_heads=2, num_key_value_heads=1, initializer_range=0.08)
    budget = 1 << 20
    alone = LLM(path, skip_tokenizer_init=True, block_size=8, kv_cache_memory_bytes=budget).llm_engine.model_runner
    llm = LLM(path, skip_tokenizer_init=True, block_size=8, kv_cache_memory_bytes=budget,
              speculative_config={"model": small, "num_speculative_tokens": 2})
    target, draft = llm.llm_engine.model_runner, llm.llm_engine.speculator.draft.runner
    per_block = (target.kv_bytes_per_token + draft.kv_bytes_per_token) * 8
    assert target.num_blocks == budget // per_block < alone.num_blocks == budget // (target.kv_bytes_per_token * 8)
    pools = sum(r.kv_cache.numel() * r.kv_cache.element_size() for r in (target, draft))
    assert pools <= budget and draft.num_blocks == target.num_blocks


def test_a_free_ram_budget_takes_its_share_after_the_drafts_weights(make_checkpoint, monkeypatch):
    """On CPU the pool is a share of the free RAM; the draft's weights, loaded after the pool is
    sized, come off the free RAM first (as the target's did), not off the share at full size."""
    from tokenmill.engine import model_runner as mr

    path, _ = make_checkpoint("LlamaForCausalLM", num_key_value_heads=2, initializer_range=0.08)
    small, _ = make_checkpoint("LlamaForCausalLM", seed=5, num_hidden_layers=1, hidden_size=32,
                               num_attention_heads=2, num_key_value_heads=1, initializer_range=0.08)
    spec = {"model": small, "num_speculative_tokens": 2}
    cost = draft_cost(SpeculativeConfig.parse(spec), torch.float32)
    free = cost.weight_bytes + (8 << 20)
    monkeypatch.setattr(mr, "_available_ram", lambda: free)
    target = LLM(path, skip_tokenizer_init=True, block_size=8, max_num_seqs=4096,
                 speculative_config=spec).llm_engine.model_runner
    per_block = (target.kv_bytes_per_token + cost.kv_bytes_per_token) * 8
    assert target.num_blocks == int((free - cost.weight_bytes) * mr._CPU_MEMORY_FRACTION) // per_block > 0


class _FakeCost:
    """A 1 GB, 0.5 GFLOP-per-token model: decode is bandwidth-bound until ~200 tokens a step on
    a device of 100 TFLOP/s and 1 TB/s (ridge 100 FLOP/byte)."""

    def step(self, chunks, logit_rows):
        tokens = sum(n for _, n in chunks)
        return 5e8 * tokens, 1e9 + 1e4 * sum(c for c, _ in chunks)


def _decoding(n: int, context: int = 100):
    from tokenmill.engine.sequence import Request, SequenceStatus

    seqs = []
    for i in range(n):
        seq = Request(f"r{i}", None, [5 + j % 7 for j in range(context)], SamplingParams(max_tokens=50)).seqs[0]
        seq.num_computed_tokens, seq.status = context - 1, SequenceStatus.RUNNING
        seqs.append(seq)
    return seqs


def test_auto_speculates_only_while_the_roofline_says_it_pays():
    from tokenmill.spec_decode.speculator import Speculator

    config = SpeculativeConfig.parse({"method": "auto", "num_speculative_tokens": 4, "prompt_lookup_min": 1,
                                      "prompt_lookup_max": 2})
    spec = Speculator(config, _FakeCost(), max_model_len=1000)
    spec.peaks = (1e14, 1e12)
    small = _decoding(2)
    spec.propose(small)  # 2 x 5 tokens: still bandwidth-bound, proposals are nearly free
    assert spec.stats.decision["speculate"] and all(s.spec_token_ids for s in small)
    big = _decoding(512)
    spec.propose(big)  # 512 x 5 tokens: well past the ridge, each proposal costs a full token
    d = spec.stats.decision
    assert not d["speculate"] and not any(s.spec_token_ids for s in big)
    assert d["speculative_s_per_token"] > d["plain_s_per_token"] and d["batch"] == 512
    assert (spec.stats.steps_with_proposals, spec.stats.steps_without) == (1, 1)
    # Measured acceptance moves the switch: at 128 sequences the prior (half of each position
    # accepted) does not pay for 5x the tokens, every proposal accepted does; at 512 nothing does.
    mid = _decoding(128)
    spec.propose(mid)
    assert not spec.stats.decision["speculate"]
    for _ in range(8):  # every proposal accepted, 1024 times
        spec.record({s.seq_id: 4 for s in mid}, {s.seq_id: [None] * 5 for s in mid})
    spec.propose(mid)
    assert spec.stats.decision["speculate"] and spec.stats.decision["expected_accepted_length"] > 4.9
    spec.propose(_decoding(512))
    assert not spec.stats.decision["speculate"]
    # The workload changes and proposals stop being accepted: recent ones outweigh the past,
    # though the counters (vLLM's) still hold every proposal ever verified.
    for _ in range(8):
        spec.record({s.seq_id: 4 for s in mid}, {s.seq_id: [None] for s in mid})
    spec.propose(mid)
    assert not spec.stats.decision["speculate"] and spec.stats.decision["expected_accepted_length"] < 2.5
    assert spec.stats.num_drafts == 2048 and spec.stats.acceptance_rate == 0.5


@pytest.mark.parametrize("layout,spec", [
    (dict(tensor_parallel_size=2), NGRAM),
    # The draft runs whole in rank 0; its proposals reach the other ranks with the step.
    (dict(tensor_parallel_size=2), "draft"),
    (dict(pipeline_parallel_size=2), "draft"),
])
def test_parallel_ranks_verify_proposals_exactly(make_checkpoint, layout, spec):
    path, hf = make_checkpoint("LlamaForCausalLM", num_key_value_heads=2, initializer_range=0.08)
    if spec == "draft":
        small, _ = make_checkpoint("LlamaForCausalLM", seed=5, num_hidden_layers=1, hidden_size=32,
                                   num_attention_heads=2, num_key_value_heads=1, initializer_range=0.08)
        spec = {"model": small, "num_speculative_tokens": 3}
    prompts = repetitive_prompts(seed=3)[:3]
    llm = LLM(path, skip_tokenizer_init=True, distributed_timeout_seconds=60, speculative_config=spec, **layout)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                            SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True), use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(hf, p, NEW) for p in prompts]
        assert spec_stats(llm).num_drafts > 0 and spec_stats(llm).num_accepted_tokens > 0
        check_invariants(llm.llm_engine)
    finally:
        llm.shutdown()


def test_stop_strings_and_json_schema_with_proposals():
    """On the demo model (a tokenizer, real text): a stop string met inside accepted proposals
    ends the output where plain decoding ends it, and a JSON schema holds with proposals
    checked against the grammar."""
    import json

    from tokenmill.cli import DEMO_MODEL
    from tokenmill.structured.params import StructuredOutputsParams

    text = open("data/demo_heldout.txt").read()[:600]
    prompt = f"Copy this text.\n{text}\nCopy:\n{text[:120]}"
    plain = LLM(DEMO_MODEL, max_num_seqs=4)
    spec = LLM(DEMO_MODEL, max_num_seqs=4, speculative_config={"method": "ngram", "num_speculative_tokens": 4,
                                                                 "prompt_lookup_min": 2, "prompt_lookup_max": 4})
    free = SamplingParams(temperature=0, max_tokens=60)
    ref = plain.generate([prompt], free, use_tqdm=False)[0].outputs[0]
    stop = ref.text[20:26]
    params = SamplingParams(temperature=0, max_tokens=60, stop=[stop])
    a = plain.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    b = spec.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    assert (b.text, b.token_ids, b.stop_reason) == (a.text, a.token_ids, stop)
    schema = {"type": "object", "properties": {"name": {"enum": ["copy", "paste"]}, "n": {"enum": [1, 2, 3]}},
              "required": ["name", "n"]}
    constrained = SamplingParams(temperature=0, max_tokens=60, structured_outputs=StructuredOutputsParams(json=schema))
    json_prompt = prompt + '\n{"name": "copy", "n": 1}\n{"name": "copy", "n": 2}\n'
    a = plain.generate([json_prompt], constrained, use_tqdm=False)[0].outputs[0]
    before = spec_stats(spec).num_accepted_tokens
    b = spec.generate([json_prompt], constrained, use_tqdm=False)[0].outputs[0]
    assert b.token_ids == a.token_ids and set(json.loads(b.text)) == {"name", "n"}
    assert spec_stats(spec).num_accepted_tokens > before  # the constrained request took proposals


def _auto(k: int = 4):
    from tokenmill.spec_decode.speculator import Speculator

    config = SpeculativeConfig.parse({"method": "auto", "num_speculative_tokens": k, "prompt_lookup_min": 1,
                                      "prompt_lookup_max": 2})
    spec = Speculator(config, _FakeCost(), max_model_len=1000)
    spec.peaks = (1e14, 1e12)
    return spec


def test_auto_counts_each_proposal_and_tests_a_no_again():
    from tokenmill.spec_decode.speculator import PROBE_SHARE

    spec = _auto()
    # 20 sequences with one output token left: one proposal each, expected to emit 1.5 tokens
    # (the prior), not the 1.94 of all k = 4 positions.
    last = _decoding(20)
    for s in last:
        s.params.max_tokens = s.num_output_tokens + 2
    spec.propose(last)
    d = spec.stats.decision
    assert d["speculate"] and d["proposed_tokens"] == 20 and d["expected_tokens"] == pytest.approx(30.0, abs=0.01), d
    # Past the ridge a "no" holds, until the declined steps' time pays for a probe (PROBE_SHARE).
    big = _decoding(512)
    declined = 0
    while True:
        spec.propose(big)
        d = spec.stats.decision
        if d["speculate"]:
            break
        declined += 1
        assert declined < 1000
    assert d["probe"] and all(s.spec_token_ids for s in big)
    extra = d["speculative_step_s"] - d["plain_step_s"]
    # The probe comes once the declined steps' time, times PROBE_SHARE, covers its extra cost.
    assert declined == pytest.approx(extra / (PROBE_SHARE * d["plain_step_s"]), abs=1.01)


def test_measured_steps_overrule_the_roofline():
    """At batch 2 the roofline calls proposals free; steps measured on a host where each proposed
    row costs as much as a plain step (small weights in cache, overhead per row) turn it to no,
    and a slow plain step also raises the host overhead the roofline is corrected by."""
    from tokenmill.spec_decode.step_times import Line

    spec = _auto()
    pair = _decoding(2)
    spec.propose(pair)
    assert spec.stats.decision["speculate"]
    for _ in range(6):
        spec.observe_step(0.004, [(100, 1)] * 2, rows=0)
        spec.observe_step(0.004 + 8 * 0.002, [(100, 5)] * 2, rows=8)
    for s in pair:
        s.spec_token_ids = []
    spec.propose(pair)
    d = spec.stats.decision
    assert not d["speculate"] and d["plain_step_s"] == pytest.approx(0.004, rel=0.1), d
    assert d["per_proposed_token_s"] == pytest.approx(0.002, rel=0.1) and spec.overhead_s > 0.0029  # 4 ms measured, ~1 ms roofline
    # The line: without data the prior; with data at two row counts, the data's slope.
    line = Line()
    assert line.predict(4, 1.0, 0.5, 4) == 3.0
    for x, y in [(0, 2.0), (8, 10.0)] * 10:
        line.add(x, y)
    assert line.predict(4, 1.0, 0.5, 4) == pytest.approx(6.0, rel=0.02)


def test_a_drafts_no_is_reused_like_any_clear_no(make_checkpoint, monkeypatch):
    """With a draft model a "no" covers the best case (every budget proposed), so it holds for
    REUSE_STEPS steps as the lookup-free "no" does, instead of working the plan out every step."""
    from tokenmill.spec_decode.speculator import REUSE_STEPS, Speculator

    path, _ = make_checkpoint("LlamaForCausalLM", num_key_value_heads=2, initializer_range=0.08)
    small, _ = make_checkpoint("LlamaForCausalLM", seed=5, num_hidden_layers=1, initializer_range=0.08)
    plans = []
    original = Speculator._plan
    monkeypatch.setattr(Speculator, "_plan", lambda self, *a: plans.append(1) or original(self, *a))
    llm = LLM(path, skip_tokenizer_init=True, speculative_config={"method": "auto", "model": small,
                                                                  "num_speculative_tokens": 4})
    spec = llm.llm_engine.speculator
    # Proposing is free here but each token a new mirror catches up costs 50 ms: the best case
    # pays before the catch-up is counted, and never after (a probe aside).
    monkeypatch.setattr(spec, "_draft_line", lambda seqs: (0.0, 0.05))
    llm.generate([{"prompt_token_ids": p} for p in random_prompts([9] * 8, seed=2)],
                 SamplingParams(temperature=0, max_tokens=40, ignore_eos=True), use_tqdm=False)
    s = spec_stats(llm)
    assert s.steps_without > 30
    assert len(plans) <= s.steps_with_proposals + s.steps_without / (REUSE_STEPS + 1) + 8, (len(plans), s)
