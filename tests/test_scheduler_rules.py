"""The scheduler's rules on a bare block manager (no model): who gets blocks and budget when the
pool or the token budget is short, with proposals and with priorities."""
from __future__ import annotations

from tokenmill.config import SchedulerConfig
from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.sequence import Request, Sequence, SequenceStatus
from tokenmill.sampling_params import SamplingParams


def make(num_blocks: int, budget: int = 64, policy: str = "fcfs") -> Scheduler:
    bm = BlockManager(num_blocks, 4, enable_prefix_caching=False)
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget, max_model_len=100,
                             scheduling_policy=policy)
    return Scheduler(config, bm, set())


def decoding(sched: Scheduler, num_tokens: int, rid: str, priority: int = 0) -> Sequence:
    """A running sequence whose next step computes its last token (a decode)."""
    seq = Request(rid, None, list(range(1, num_tokens + 1)), SamplingParams(max_tokens=50), priority).seqs[0]
    assert sched.block_manager.allocate_slots(seq, num_tokens - 1)
    seq.num_computed_tokens = num_tokens - 1
    seq.status = SequenceStatus.RUNNING
    sched.running.append(seq)
    return seq


def assert_blocks_add_up(sched: Scheduler) -> None:
    """Every block is free or in exactly one running sequence's table; waiting ones hold none."""
    bm = sched.block_manager
    held = [b for s in sched.running for b in s.block_table]
    assert len(set(held)) == len(held) and not set(held) & set(bm.free_queue)
    assert len(held) + bm.num_free_blocks == bm.num_blocks
    assert all(not s.block_table for s in sched.waiting)


def ids(pairs) -> list[tuple[str, int]]:
    return [(s.request.request_id, n) for s, n in pairs]


def test_proposals_take_only_blocks_no_decode_needs():
    sched = make(num_blocks=5)
    a = decoding(sched, 7, "A")  # 2 blocks; its decode at position 6 needs no new one
    decoding(sched, 9, "B")      # 3rd block needed for position 8: the last free one
    a.spec_token_ids = [11, 12, 13]  # positions 7..9: 7 fits in A's block, 8 would need another
    out = sched.schedule()
    assert ids(out.scheduled) == [("A", 2), ("B", 1)]
    assert out.num_preempted == 0 and not sched.waiting
    assert a.spec_token_ids == [11]
    assert_blocks_add_up(sched)


def test_proposals_take_only_budget_no_decode_needs():
    sched = make(num_blocks=50, budget=4)
    seqs = [decoding(sched, 7, f"S{i}") for i in range(3)]
    seqs[0].spec_token_ids = [11, 12, 13]
    out = sched.schedule()
    assert ids(out.scheduled) == [("S0", 2), ("S1", 1), ("S2", 1)]
    assert out.num_batched_tokens == 4


def test_proposals_never_cost_a_waiting_request_its_blocks():
    """A waiting prompt is admitted before proposals take blocks: under priority scheduling the
    proposals would otherwise make it preempt a running request, and under fcfs keep it waiting."""
    for policy, waiting_priority in (("priority", 1), ("fcfs", 0)):
        sched = make(num_blocks=4, policy=policy)
        a = decoding(sched, 7, "A", priority=0)  # 2 blocks, its decode fits
        decoding(sched, 3, "B", priority=5 if policy == "priority" else 0)  # 1 block
        sched.add(Request("C", None, [1, 2, 3, 4], SamplingParams(max_tokens=5), waiting_priority).seqs[0])
        a.spec_token_ids = [11, 12, 13]  # would take the last free block
        out = sched.schedule()
        assert ids(out.scheduled) == [("A", 2), ("B", 1), ("C", 4)], policy
        assert out.num_preempted == 0 and sched.num_priority_preemptions == 0 and not sched.waiting
        assert a.spec_token_ids == [11]
        assert_blocks_add_up(sched)


def test_a_running_request_preempts_the_lowest_priority_one_even_if_scheduled_first():
    sched = make(num_blocks=4, policy="priority")
    decoding(sched, 9, "low", priority=5)  # admitted first, 2 blocks, needs a 3rd
    decoding(sched, 5, "high", priority=0)  # 1 block, needs a 2nd; one block is free
    out = sched.schedule()
    # "low" took the free block first; "high" then needs it and "low" ranks below it.
    assert ids(out.scheduled) == [("high", 1)]
    assert [s.request.request_id for s in sched.waiting] == ["low"]
    assert out.num_batched_tokens == 1
    assert_blocks_add_up(sched)


def test_a_preempted_low_priority_request_does_not_hold_back_those_after_it():
    sched = make(num_blocks=3, policy="priority")
    decoding(sched, 9, "p9", priority=9)  # needs a 3rd block, none free: it goes back to waiting
    decoding(sched, 3, "p0", priority=0)  # fits in the block it has
    out = sched.schedule()
    assert ids(out.scheduled) == [("p0", 1)]
    assert [s.request.request_id for s in sched.running] == ["p0"]


def test_fcfs_preempts_the_newest():
    sched = make(num_blocks=4)
    decoding(sched, 9, "old")
    decoding(sched, 5, "new")
    out = sched.schedule()
    assert ids(out.scheduled) == [("old", 1)]
    assert [s.request.request_id for s in sched.waiting] == ["new"]
