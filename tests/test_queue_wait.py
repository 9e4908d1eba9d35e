"""The bouncer's wait estimate (server/queue_wait.py) on made-up numbers, the fit of step costs
and the engine-thread probe that feeds it (server/load_probe.py)."""
from __future__ import annotations

import math
import random
from collections import deque

import pytest

from tokenmill.server.load_probe import LoadProbe, fit_costs
from tokenmill.server.queue_wait import MIN_LENGTHS, Lengths, LoadView, SeqLoad, ahead_of, forecast, retry_after


def seq(rid: str, steps: int = 10, blocks: int = 1, prefill: int = 0, priority: int = 0) -> SeqLoad:
    return SeqLoad(rid, steps, blocks, prefill, priority)


def view(running=(), waiting=(), **kw) -> LoadView:
    kw = {"step_s": 0.1, "max_num_seqs": 2, "num_blocks": 100, "measured": True, **kw}
    return LoadView(tuple(running), tuple(waiting), frozenset(s.request_id for s in (*running, *waiting)), **kw)


def test_an_idle_engine_starts_it_at_once():
    assert forecast(view(), [], [seq("new")]).wait_s == 0.0


def test_a_free_slot_means_no_wait_and_a_full_batch_waits_for_the_first_to_end():
    assert forecast(view([seq("a", 10)]), [], [seq("new")]).wait_s == 0.0
    fc = forecast(view([seq("a", 10), seq("b", 20)]), [], [seq("new")])
    assert fc.wait_s == pytest.approx(10 * 0.1)
    assert fc.finish_s == pytest.approx({"a": 1.0, "b": 2.0})  # b's last 10 steps run beside the new one


def test_each_sequence_in_the_batch_makes_a_step_dearer():
    v = view([seq("a", 10), seq("b", 20)], seq_s=0.05)
    assert forecast(v, [], [seq("new")]).wait_s == pytest.approx(10 * (0.1 + 2 * 0.05))


def test_the_queue_ahead_goes_first_and_its_prompts_cost_time():
    v = view([seq("a", 10), seq("b", 30)], prefill_s=0.001)
    ahead = [seq("q", 5, prefill=500)]
    fc = forecast(v, ahead, [seq("new", prefill=900)])
    # q starts when a ends (step 10), its 500-token prompt costs 0.5 s; it ends at step 15,
    # before b, and the new request takes its slot then (its own prompt is not part of its wait).
    assert fc.wait_s == pytest.approx(10 * 0.1 + 0.5 + 5 * 0.1)
    assert fc.start_s == [(pytest.approx(1.0), 500)]
    assert fc.until_prefilled(400) == pytest.approx(1.0) and fc.until_prefilled(501) == math.inf


def test_kv_claims_hold_it_back_when_slots_do_not():
    v = view([seq("a", 10, blocks=50), seq("b", 40, blocks=40)], max_num_seqs=8)
    assert forecast(v, [], [seq("new", blocks=10)]).wait_s == 0.0
    assert forecast(v, [], [seq("new", blocks=11)]).wait_s == pytest.approx(1.0)  # until a's 50 blocks free
    assert forecast(v, [], [seq("new", blocks=60)]).wait_s == pytest.approx(1.0)
    assert forecast(v, [], [seq("new", blocks=61)]).wait_s == pytest.approx(4.0)  # needs both ended
    # More than the pool: it starts alone, once everything ended (the engine ends it if it outgrows the pool).
    assert forecast(v, [], [seq("new", blocks=101)]).wait_s == pytest.approx(4.0)
    assert forecast(view(max_num_seqs=8), [], [seq("new", blocks=10**6)]).wait_s == 0.0


def test_an_overcommitted_pool_waits_for_enough_to_end():
    v = view([seq("a", 10, blocks=80), seq("b", 20, blocks=80)], max_num_seqs=8)  # 160 claimed of 100
    assert forecast(v, [], [seq("new", blocks=10)]).wait_s == pytest.approx(1.0)


def test_a_request_of_several_sequences_starts_with_its_first():
    v = view([seq("a", 10), seq("b", 20)])
    # Its first sequence starts when a ends (step 10): its first token comes then, whatever n is.
    assert forecast(v, [], [seq("new", 5), seq("new", 5)]).wait_s == pytest.approx(1.0)
    assert forecast(v, [], [seq("new", 5)] * 16).wait_s == pytest.approx(1.0)  # n above max_num_seqs
    assert "new" not in forecast(v, [], [seq("new")]).finish_s
    # A list of prompts (several requests) has started once the last of them has.
    assert forecast(v, [], [seq("p0", 5), seq("p1", 5)]).wait_s == pytest.approx(1.5)


def test_until_leave_counts_requests_not_sequences():
    fc = forecast(view([seq("a", 10), seq("a", 30), seq("b", 20)], max_num_seqs=4), [], [seq("new")])
    assert fc.until_leave(0) == 0.0
    assert fc.until_leave(1) == pytest.approx(2.0)  # b; a ends with its second sequence
    assert fc.until_leave(2) == pytest.approx(3.0)
    assert fc.until_leave(1, {"a"}) == pytest.approx(3.0)
    assert fc.until_leave(3) == math.inf
    assert fc.until_leave(1, {"a", "gone"}) == 0.0  # one the forecast did not see has ended already


def test_priority_waits_only_behind_equal_or_higher():
    waiting = [seq("hi", priority=-1), seq("mid", priority=0), seq("lo", priority=5)]
    v = view(waiting=waiting, by_priority=True)
    unseen = [seq("new-mid", priority=0)]
    assert [s.request_id for s in ahead_of(v, unseen, 0)] == ["hi", "mid", "new-mid"]
    assert [s.request_id for s in ahead_of(v, unseen, -1)] == ["hi"]
    fcfs = view(waiting=waiting)
    assert [s.request_id for s in ahead_of(fcfs, unseen, -1)] == ["hi", "mid", "lo", "new-mid"]


def test_retry_after_is_the_excess_wait_in_whole_seconds():
    assert retry_after(7.2, 5.0) == 3.0
    assert retry_after(5.1, 5.0) == 1.0
    assert retry_after(30.0, 5.0) == 25.0
    assert retry_after(math.inf, 5.0) == 60.0


def test_lengths_fall_back_to_max_tokens_until_enough_are_measured():
    few = Lengths.of([10.0] * (MIN_LENGTHS - 1))
    assert few.steps_left(0, 64) == 64
    assert few.steps_left(60, 64) == 4
    assert few.steps_left(64, 64) == 0


def test_lengths_expect_the_mean_of_those_longer_than_so_far():
    lengths = Lengths.of([10.0] * 16 + [30.0] * 16)
    assert lengths.steps_left(0, 64) == 20  # mean 20
    assert lengths.steps_left(15, 64) == 15  # only the 30s remain: 30 - 15
    assert lengths.steps_left(0, 20) == 15  # capped: (10 + 20) / 2
    assert lengths.steps_left(31, 64) == 33  # longer than any measured: the bound


def test_lengths_cut_at_their_cap_count_as_running_to_any_cap():
    cut = Lengths.of([math.inf] * 16 + [10.0] * 16)
    assert cut.steps_left(0, 100) == 55  # (16 x 10 + 16 x 100) / 32
    assert Lengths.of([math.inf] * 32).steps_left(5, 64) == 59


def test_fit_costs_recovers_the_costs_of_a_turn():
    rng = random.Random(0)
    turns: deque = deque()
    for _ in range(64):
        k, p = rng.randrange(1, 9), rng.choice([0, 0, 0, 200, 512])
        turns.append((k, p, 0.05 + 0.02 * k + 0.0015 * p))
    step, per_seq, per_token = fit_costs(turns)
    assert step == pytest.approx(0.05, rel=0.05) and per_seq == pytest.approx(0.02, rel=0.05)
    assert per_token == pytest.approx(0.0015, rel=0.05)


def test_fit_costs_stays_sane_when_every_turn_looks_alike():
    turns = deque([(8, 0, 0.2)] * 64)
    step, per_seq, per_token = fit_costs(turns)
    assert step >= 0 and per_seq >= 0 and per_token >= 0
    assert step + 8 * per_seq == pytest.approx(0.2, rel=0.02)  # the cost of such a turn is right


def test_the_probe_reads_the_engine_and_measures_it():
    from tokenmill import LLM, SamplingParams
    from tokenmill.cli import DEMO_MODEL

    llm = LLM(model=DEMO_MODEL, max_num_seqs=2, max_num_batched_tokens=64)
    engine = llm.llm_engine
    probe = LoadProbe(engine)
    for i in range(3):
        engine.add_request({"prompt_token_ids": list(range(5, 45))}, SamplingParams(max_tokens=12, ignore_eos=True),
                           request_id=f"r{i}")
    probe.on_step(engine, False)
    v = probe.view
    assert not v.measured and v.max_num_seqs == 2 and v.num_blocks == engine.block_manager.num_blocks
    assert [s.request_id for s in v.waiting] == ["r0", "r1", "r2"] and v.ids == {"r0", "r1", "r2"}
    assert v.waiting[0] == SeqLoad("r0", 12, math.ceil(52 / engine.block_manager.block_size), 40, 0)
    engine.step()
    probe.on_step(engine, True)
    v = probe.view
    # The 64-token budget held r0's prompt and a chunk of r1's; r0 decodes now, r1 has 16 to go.
    assert [(s.request_id, s.prefill, s.steps) for s in v.running] == [("r0", 0, 11), ("r1", 16, 12)]
    assert [s.request_id for s in v.waiting] == ["r2"]
    while engine.has_unfinished_requests():
        engine.step()
        probe.on_step(engine, True)
    assert probe.view.measured and probe.view.step_s + probe.view.seq_s > 0
    assert not probe.view.running and not probe.view.ids
    assert list(probe._lengths) == [math.inf] * 3  # all cut at max_tokens
