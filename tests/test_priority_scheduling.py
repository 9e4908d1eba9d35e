"""--scheduling-policy priority: lower priority values run first, a waiting request preempts
lower-priority running ones for KV blocks, and outputs stay exact through it."""
from __future__ import annotations

import pytest

from tests.conftest import hf_greedy, random_prompts
from tokenmill import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


@pytest.fixture(scope="module")
def model(make_checkpoint):
    return make_checkpoint("LlamaForCausalLM", num_key_value_heads=2)


def test_queue_order_and_preemption_follow_priority(model):
    path, hf = model
    prompts = random_prompts([30, 30, 30, 30], seed=4)
    # 16 blocks of 4 tokens: two 40-token sequences fit, a third must wait or preempt.
    llm = LLM(path, skip_tokenizer_init=True, block_size=4, num_gpu_blocks_override=22, max_num_seqs=4,
              scheduling_policy="priority")
    engine = llm.llm_engine
    low = [engine.add_request({"prompt_token_ids": p}, GREEDY, request_id=f"low{i}", priority=5)
           for i, p in enumerate(prompts[:2])]
    engine.step()  # both low-priority requests are running
    assert {s.request.request_id for s in engine.scheduler.running} == set(low)
    engine.add_request({"prompt_token_ids": prompts[2]}, GREEDY, request_id="mid", priority=2)
    engine.add_request({"prompt_token_ids": prompts[3]}, GREEDY, request_id="urgent", priority=-1)
    assert [s.request.request_id for s in engine.scheduler.waiting] == ["urgent", "mid"]
    engine.step()
    running = {s.request.request_id for s in engine.scheduler.running}
    assert "urgent" in running, running  # it preempted a low-priority request to get its blocks
    assert engine.scheduler.num_priority_preemptions >= 1
    assert {s.request.request_id for s in engine.scheduler.waiting} & set(low)
    finished_order, outputs = [], {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                finished_order.append(o.request_id)
                outputs[o.request_id] = o.outputs[0].token_ids
    assert finished_order.index("urgent") < finished_order.index("mid")
    for rid, p in zip(["low0", "low1", "mid", "urgent"], prompts):
        assert outputs[rid] == hf_greedy(hf, p, 10), rid  # preemption recomputes, exactly
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_fcfs_refuses_priorities_and_generate_takes_them(model):
    path, _ = model
    fcfs = LLM(path, skip_tokenizer_init=True)
    with pytest.raises(ValueError, match="priority scheduling is off"):
        fcfs.generate([{"prompt_token_ids": [5, 6]}], GREEDY, use_tqdm=False, priority=[1])
    prio = LLM(path, skip_tokenizer_init=True, scheduling_policy="priority", max_num_seqs=1)
    outs = prio.generate([{"prompt_token_ids": [5, 6]}, {"prompt_token_ids": [7, 8]}], GREEDY, use_tqdm=False,
                         priority=[3, 0])
    # One at a time: the priority-0 request ran first, so it finished first.
    assert outs[1].metrics.finished_time <= outs[0].metrics.first_token_time
    with pytest.raises(ValueError, match="priorities for"):
        prio.generate([{"prompt_token_ids": [5, 6]}], GREEDY, use_tqdm=False, priority=[1, 2])
    with pytest.raises(ValueError, match="scheduling_policy"):
        LLM(path, skip_tokenizer_init=True, scheduling_policy="lifo")
