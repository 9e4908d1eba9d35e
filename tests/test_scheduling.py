"""Continuous batching under pressure: tiny pools (preemption), odd block sizes, small budgets."""
from __future__ import annotations

import pytest

from tests.conftest import hf_greedy, random_prompts
from tokenmill import LLM, SamplingParams

LENGTHS = [5, 60, 23, 41, 9, 75, 30, 14]
NEW = 12


@pytest.fixture(scope="module")
def reference(make_checkpoint):
    path, hf = make_checkpoint("LlamaForCausalLM", num_key_value_heads=2)
    prompts = random_prompts(LENGTHS, seed=11)
    return path, prompts, [hf_greedy(hf, p, NEW) for p in prompts]


@pytest.mark.parametrize("block_size", [1, 16, 7])
@pytest.mark.parametrize("pool_tokens,budget", [(None, 2048), (140, 2048), (140, 32)])
def test_preemption_block_sizes_and_chunking_stay_exact(reference, block_size, pool_tokens, budget):
    path, prompts, expected = reference
    blocks = None if pool_tokens is None else -(-pool_tokens // block_size)
    llm = LLM(path, skip_tokenizer_init=True, block_size=block_size, num_gpu_blocks_override=blocks,
              max_num_batched_tokens=budget, max_num_seqs=8)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    engine = llm.llm_engine
    stats = engine.get_stats()
    if pool_tokens is not None:
        assert stats.num_preemptions > 0, "the pool was meant to be too small for the batch"
    assert stats.generation_tokens == NEW * len(prompts)
    assert stats.prompt_tokens >= sum(LENGTHS)  # recomputation after preemption adds to it
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.scheduler.running and not engine.scheduler.waiting


def test_budget_smaller_than_prompt_prefills_in_chunks(reference):
    path, prompts, expected = reference
    llm = LLM(path, skip_tokenizer_init=True, max_num_batched_tokens=16)
    engine = llm.llm_engine
    engine.add_request({"prompt_token_ids": prompts[5]}, SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True))
    steps_to_first_token = 0
    while True:
        outs = engine.step()
        steps_to_first_token += 1
        assert engine.get_stats().batch_num_tokens <= 16
        if outs and outs[0].outputs[0].token_ids:
            break
    assert steps_to_first_token == -(-len(prompts[5]) // 16)
    while engine.has_unfinished_requests():
        outs = engine.step()
    assert outs[0].outputs[0].token_ids == expected[5]


def test_requests_join_and_leave_every_step(reference):
    path, prompts, expected = reference
    llm = LLM(path, skip_tokenizer_init=True, max_num_seqs=3)
    engine = llm.llm_engine
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (2, NEW, 5, NEW, NEW)]
    for p, sp in zip(prompts[:5], params):
        engine.add_request({"prompt_token_ids": p}, sp)
    done, batch_sizes = {}, []
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o.outputs[0].token_ids
        batch_sizes.append(engine.get_stats().batch_num_seqs)
        assert engine.get_stats().num_requests_running <= 3
    assert max(batch_sizes) == 3
    for i, sp in enumerate(params):
        assert done[str(i)] == expected[i][:sp.max_tokens]


def test_abort_frees_blocks_and_others_finish(reference):
    path, prompts, expected = reference
    llm = LLM(path, skip_tokenizer_init=True)
    engine = llm.llm_engine
    sp = SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True)
    engine.add_request({"prompt_token_ids": prompts[0]}, sp, request_id="keep")
    engine.add_request({"prompt_token_ids": prompts[1]}, sp, request_id="drop")
    engine.step()
    assert engine.block_manager.num_used_blocks > 0
    engine.abort_request("drop")
    outs = {}
    while engine.has_unfinished_requests():
        outs.update({o.request_id: o for o in engine.step()})
    assert outs["keep"].outputs[0].token_ids == expected[0]
    assert outs["drop"].outputs[0].finish_reason == "abort"
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


@pytest.mark.parametrize("arch,overrides", [
    ("MistralForCausalLM", dict(sliding_window=8)),
    ("Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    ("BloomForCausalLM", dict()),
    ("GPT2LMHeadModel", dict(n_inner=128)),
    ("OPTForCausalLM", dict(ffn_dim=128, do_layer_norm_before=False, word_embed_proj_dim=32)),
])
def test_other_architectures_under_pressure(make_checkpoint, arch, overrides):
    """Sliding windows and biases through chunked prefill, odd block sizes and preemption."""
    path, hf = make_checkpoint(arch, **overrides)
    prompts = random_prompts(LENGTHS, seed=12)
    expected = [hf_greedy(hf, p, NEW) for p in prompts]
    llm = LLM(path, skip_tokenizer_init=True, block_size=5, num_gpu_blocks_override=28, max_num_batched_tokens=16)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert llm.llm_engine.get_stats().num_preemptions > 0


def test_steps_carry_only_diffs_and_every_rank_table_stays_in_sync(reference):
    """The persistent batch: what rank 0 sends other ranks each step does not grow with the
    context, and the tables rebuilt from the diffs match the block manager's, through
    preemption (tables freed and handed out again) and chunked prefill."""
    import pickle

    path, prompts, expected = reference
    llm = LLM(path, skip_tokenizer_init=True, block_size=4, num_gpu_blocks_override=40, max_num_batched_tokens=32,
              max_num_seqs=8)
    runner = llm.llm_engine.model_runner
    sizes, run = [], runner.run

    def checked_run(step):
        out = run(step)  # applies step.diff to runner.batch
        for mb in step.micro_batches:
            for seq, _ in mb.ordered:
                row = runner.batch.rows[seq.seq_id]
                assert runner.batch.tables[row, :len(seq.block_table)].tolist() == seq.block_table
        sizes.append((sum(len(m.seq_ids) for m in step.micro_batches), len(pickle.dumps(step.for_workers()))))
        return out

    runner.run = checked_run
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=NEW, ignore_eos=True), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == expected
    assert llm.llm_engine.get_stats().num_preemptions > 0

    # One long sequence: its decode steps' messages stay the same size as its context grows.
    sizes.clear()
    llm.generate([{"prompt_token_ids": prompts[0]}], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True),
                 use_tqdm=False)
    decode_sizes = [size for n, size in sizes[1:]]
    assert max(decode_sizes) - min(decode_sizes) < 64, decode_sizes
    # Freed sequences leave every rank's batch with the next step's diff.
    assert len(runner.batch.rows) == len(runner.differ) == 1
