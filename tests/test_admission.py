"""The bouncer's capacity rules (server/admission.py) and fair shares (server/fair_share.py),
without a server: a fake engine whose load view the tests set."""
from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.sequence import Request
from tokenmill.sampling_params import SamplingParams
from tokenmill.server.access import AccessController
from tokenmill.server.admission import Admission, CapacityLimits
from tokenmill.server.api_keys import KeyStore
from tokenmill.server.fair_share import RETURN_GRACE_S, FairShares
from tokenmill.server.metrics import ServerMetrics
from tokenmill.server.queue_wait import LoadView, SeqLoad
from tokenmill.server.rate_limit import RateLimiter
from tokenmill.server.refusal import Refusal


# --- fair shares ------------------------------------------------------------------------------

def fill(shares: FairShares, key: str, n: int, weight: float = 1.0) -> None:
    for i in range(n):
        shares.add(key, weight, f"{key}-{shares.count(key)}-{i}", ())


def test_a_key_alone_may_use_the_whole_server():
    shares = FairShares(16)
    fill(shares, "a", 15)
    assert shares.over_share("a", 1.0, 1, now=0.0) is None
    assert shares.share("a", 1.0, now=0.0) == 16


def test_a_second_key_halves_the_first_ones_share():
    shares = FairShares(16)
    fill(shares, "a", 12)
    fill(shares, "b", 1)
    assert shares.over_share("a", 1.0, 1, now=0.0) == (12, 8)
    assert shares.over_share("b", 1.0, 1, now=0.0) is None
    fill(shares, "b", 6)
    assert shares.over_share("b", 1.0, 1, now=0.0) is None  # 7 + 1 = 8, its share
    fill(shares, "b", 1)
    assert shares.over_share("b", 1.0, 1, now=0.0) == (8, 8)


def test_weights_divide_the_capacity():
    shares = FairShares(16)
    fill(shares, "big", 1, weight=3.0)
    assert shares.share("big", 3.0, now=0.0) == 16
    assert shares.share("small", 1.0, now=0.0) == 4
    fill(shares, "small", 1)
    assert shares.share("big", 3.0, now=0.0) == 12
    assert shares.share("tiny", 0.01, now=0.0) == 1  # never below one request


def test_a_refused_key_keeps_its_claim_until_it_is_due_back():
    shares = FairShares(16)
    fill(shares, "a", 16)
    shares.note_refused("b", 1.0, until=5.0)
    assert shares.over_share("a", 1.0, 1, now=1.0) == (16, 8)
    assert shares.over_share("a", 1.0, 1, now=5.0) is None  # b did not come back


def test_release_is_idempotent_and_the_book_empties():
    told = []
    shares = FairShares(4, on_count=lambda key, n: told.append((key, n)))
    shares.add("a", 1.0, "r1", ())
    shares.add("a", 1.0, "r2", ())
    with pytest.raises(ValueError, match="already admitted"):
        shares.add("a", 1.0, "r1", ())
    shares.release("r1", "r1", "nope")
    assert shares.snapshot() == {"a": 1} and shares.total == 1
    shares.release("r2")
    assert shares.snapshot() == {} and shares.total == 0
    assert told == [("a", 1), ("a", 2), ("a", 1), ("a", 0)]


def test_a_key_between_two_requests_keeps_its_share_a_moment():
    shares = FairShares(16)
    shares.add("b", 1.0, "b1", ())
    shares.release("b1", now=10.0)  # b's client sends its next one in a moment
    fill(shares, "a", 9)
    assert shares.over_share("a", 1.0, 1, now=10.0 + RETURN_GRACE_S - 0.1) == (9, 8)
    assert shares.over_share("a", 1.0, 1, now=10.0 + RETURN_GRACE_S) is None


def test_unseen_lists_what_the_engine_has_not_taken_in():
    shares = FairShares(4)
    s1, s2 = SeqLoad("r1", 5, 1, 10), SeqLoad("r2", 5, 1, 20)
    shares.add("a", 1.0, "r1", (s1,))
    shares.add("a", 1.0, "r2", (s2,))
    assert shares.unseen(frozenset()) == [s1, s2]
    assert shares.unseen(frozenset({"r1"})) == [s2]
    assert shares.unseen(frozenset()) == [s2]  # r1 was seen and left: it ended, its release is coming


# --- admission ----------------------------------------------------------------------------------

@dataclass
class Job:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    priority: int = 0


def fake_engine(max_num_seqs: int = 4, num_blocks: int = 1000, policy: str = "fcfs") -> SimpleNamespace:
    validator = SimpleNamespace(max_model_len=1024)
    core = SimpleNamespace(
        tokenizer=None, validator=validator, block_manager=BlockManager(num_blocks, 16),
        scheduler_config=SimpleNamespace(max_num_seqs=max_num_seqs, max_model_len=1024, scheduling_policy=policy),
        stats=SimpleNamespace(prompt_tokens=0))
    return SimpleNamespace(engine=core, is_serving=True, step_listeners=[])


def make_admission(tmp_path, limits: CapacityLimits, **engine_kw) -> Admission:
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"keys": [{"id": "a", "key": "sk-a"}, {"id": "b", "key": "sk-b"},
                                         {"id": "heavy", "key": "sk-heavy", "weight": 3}]}))
    access = AccessController(KeyStore.from_config(None, str(keys)), RateLimiter(), None)
    return Admission(fake_engine(**engine_kw), access, limits, ServerMetrics().model("demo"), ["demo"])


HELD: list[Job] = []  # admitted jobs stay referenced, as a request handler holds its own


def job(rid: str, prompt: int = 100, max_tokens: int = 20, priority: int = 0) -> Job:
    HELD.append(Job(rid, list(range(prompt)), SamplingParams(max_tokens=max_tokens), priority))
    return HELD[-1]


@pytest.fixture(autouse=True)
def _drop_held():
    yield
    HELD.clear()


def key(name: str) -> dict[str, str]:
    return {"authorization": f"Bearer sk-{name}"}


def busy(n_running: int, steps: int, step_s: float = 0.1, **kw) -> LoadView:
    running = tuple(SeqLoad(f"run{i}", steps, 8, 0) for i in range(n_running))
    return LoadView(running, (), frozenset(s.request_id for s in running), step_s=step_s, max_num_seqs=4,
                    num_blocks=1000, measured=True, **kw)


def test_the_probe_is_attached_to_the_engine_thread(tmp_path):
    adm = make_admission(tmp_path, CapacityLimits(16, 10**6))
    assert adm.engine.step_listeners == [adm.probe.on_step]


def test_admitted_while_the_expected_wait_is_short_and_refused_with_its_estimate_after(tmp_path):
    adm = make_admission(tmp_path, CapacityLimits(64, 10**6, max_queue_wait=3.0))
    adm.probe.view = busy(4, steps=20)  # a full batch, the first ends in 2 s
    admitted = []
    with pytest.raises(Refusal) as exc:
        for i in range(40):
            j = job(f"j{i}")
            adm.admit(key("a"), [j])
            admitted.append(j)
    r = exc.value
    assert r.status == 503 and r.code == "server_at_capacity" and "--max-queue-wait" in r.message
    # Each admitted one ends after 20 steps; every 4 queued add 2 s: ~4 fit under 3 s.
    assert 3 <= len(admitted) <= 8
    assert r.retry_after >= 1 and r.retry_after == int(r.retry_after)
    adm.probe.view = busy(4, steps=200)  # the same queue, ten times longer steps ahead: a later retry
    with pytest.raises(Refusal) as later:
        adm.admit(key("b"), [job("late")])
    assert later.value.retry_after > r.retry_after  # an estimate, not a constant


def test_a_prompt_the_prefix_cache_holds_is_not_counted_as_prefill_again(tmp_path):
    """A conversation's next turn mostly hits the cache: the requests behind it do not wait for
    its whole prompt to be computed again (that over-estimate refused half a fleet's turns)."""
    def second_gets_in(cache_first: bool) -> bool:
        adm = make_admission(tmp_path, CapacityLimits(64, 10**6, max_queue_wait=1.0))
        # An idle engine whose prompt tokens cost 2 ms each: a 1,000-token prefill ahead is 2 s.
        adm.probe.view = LoadView(step_s=0.01, prefill_s=0.002, max_num_seqs=4, num_blocks=1000, measured=True)
        first = job("turn", prompt=1000)
        if cache_first:  # the conversation so far, computed and cached by its earlier turn
            seq = Request("earlier", None, first.prompt_ids, SamplingParams()).seqs[0]
            assert adm.blocks.allocate_slots(seq, seq.num_tokens)
            seq.num_computed_tokens = seq.num_tokens
            adm.blocks.cache_full_blocks(seq)
            adm.blocks.free(seq)
        adm.admit(key("a"), [first])
        try:
            adm.admit(key("a"), [job("behind", prompt=10)])
            return True
        except Refusal:
            return False

    assert not second_gets_in(cache_first=False) and second_gets_in(cache_first=True)


def test_n_above_the_batch_and_a_claim_above_the_pool_get_in_on_an_idle_server(tmp_path):
    """Neither is refused for ever: a request starts with its first sequence, and a sequence
    that would outgrow the pool starts alone (the engine ends it when it does)."""
    for n, max_tokens in ((16, 20), (1, 900)):  # 16 sequences on 4 slots; 1,000 tokens on a 50-block pool
        adm = make_admission(tmp_path, CapacityLimits(64, 10**6, max_queue_wait=1.0), num_blocks=50)
        adm.probe.view = LoadView(step_s=0.01, max_num_seqs=4, num_blocks=50, measured=True)
        HELD.append(Job(f"n{n}", list(range(100)), SamplingParams(n=n, max_tokens=max_tokens)))
        adm.admit(key("a"), [HELD[-1]])
        assert adm.shares.total == 1


def test_the_wait_rule_waits_for_measured_steps(tmp_path):
    adm = make_admission(tmp_path, CapacityLimits(64, 10**6, max_queue_wait=1.0))
    adm.probe.view = LoadView(busy(4, 1000).running, max_num_seqs=4, num_blocks=1000, measured=False)
    adm.admit(key("a"), [job("fresh")])  # a fresh server: only the counts apply


def test_the_hard_limits_stay_and_their_retry_after_is_estimated(tmp_path):
    adm = make_admission(tmp_path, CapacityLimits(2, 10**6, max_queue_wait=1e9))
    adm.probe.view = busy(0, 0)
    adm.admit(key("a"), [job("j0", max_tokens=30)])
    adm.admit(key("a"), [job("j1", max_tokens=30)])
    adm.probe.view = busy(0, 0, step_s=0.5)
    with pytest.raises(Refusal) as exc:
        adm.admit(key("a"), [job("j2")])
    assert "2 requests in progress (limit 2)" in exc.value.message
    assert exc.value.retry_after == 15.0  # the first of the two ends after its 30 steps of 0.5 s
    with pytest.raises(Exception, match="--max-num-queued-reqs"):
        adm.admit(key("a"), [job(f"many{i}") for i in range(3)])  # could never fit: 400


def test_retry_after_under_priority_counts_the_whole_queue(tmp_path):
    """A key whose own requests wait at a low priority, sending one at a higher: when its own
    end is not in the part of the queue ahead of the new request, yet it is still an estimate."""
    adm = make_admission(tmp_path, CapacityLimits(2, 10**6, max_queue_wait=1e9), policy="priority")
    adm.probe.view = busy(0, 0, by_priority=True)
    adm.admit(key("a"), [job("low0", max_tokens=30, priority=5)])
    adm.admit(key("a"), [job("low1", max_tokens=30, priority=5)])
    adm.probe.view = busy(0, 0, step_s=0.5, by_priority=True)
    with pytest.raises(Refusal) as exc:
        adm.admit(key("a"), [job("urgent", priority=-5)])
    assert exc.value.retry_after == 15.0  # the first low one ends after 30 steps of 0.5 s; not "a minute"


def test_a_request_refused_at_capacity_costs_its_key_no_quota(tmp_path):
    keys = tmp_path / "limited.json"
    keys.write_text(json.dumps({"keys": [{"id": "rl", "key": "sk-rl", "requests_per_minute": 2}]}))
    access = AccessController(KeyStore.from_config(None, str(keys)), RateLimiter(), None)
    adm = Admission(fake_engine(), access, CapacityLimits(1, 10**6, max_queue_wait=1e9),
                    ServerMetrics().model("demo"), ["demo"])
    adm.probe.view = busy(0, 0)
    adm.admit(key("rl"), [job("first")])  # one of its two a minute
    for i in range(5):
        with pytest.raises(Refusal) as full:
            adm.admit(key("rl"), [job(f"full{i}")])
        assert full.value.status == 503
    adm.release("first")
    adm.admit(key("rl"), [job("second")])  # the 503s took nothing: this is its second
    adm.release("second")
    with pytest.raises(Refusal) as limited:
        adm.admit(key("rl"), [job("third")])
    assert limited.value.status == 429


def test_one_key_cannot_take_anothers_share_whatever_its_priority(tmp_path):
    adm = make_admission(tmp_path, CapacityLimits(8, 10**6, max_queue_wait=1e9), policy="priority")
    adm.probe.view = busy(0, 0, by_priority=True)
    for i in range(8):
        adm.admit(key("a"), [job(f"a{i}", priority=-10)])  # alone: the whole server
    with pytest.raises(Refusal) as b_first:
        adm.admit(key("b"), [job("b0")])  # the server is full: b waits, and now counts as active
    assert b_first.value.code == "server_at_capacity"
    for i in range(4):  # four of a's requests end
        adm.release(f"a{i}")
    with pytest.raises(Refusal) as exc:
        adm.admit(key("a"), [job("a-more", priority=-100)])
    assert exc.value.status == 503 and exc.value.code == "fair_share_exceeded"
    assert "its share of 4" in exc.value.message
    for i in range(4):
        adm.admit(key("b"), [job(f"b{i}")])  # the freed room goes to b
    assert adm.shares.snapshot() == {"a": 4, "b": 4}


def test_weights_from_the_keys_file(tmp_path):
    adm = make_admission(tmp_path, CapacityLimits(8, 10**6, max_queue_wait=1e9))
    adm.probe.view = busy(0, 0)
    adm.admit(key("a"), [job("a0")])
    for i in range(6):
        adm.admit(key("heavy"), [job(f"h{i}")])  # weight 3 of 4: 6 of 8
    with pytest.raises(Refusal, match="its share of 6"):
        adm.admit(key("heavy"), [job("h6")])


def test_a_job_never_run_is_released_when_it_is_dropped(tmp_path):
    adm = make_admission(tmp_path, CapacityLimits(4, 10**6))
    adm.admit(key("a"), [job("orphan")])
    assert adm.shares.total == 1
    HELD.clear()  # e.g. a streamed response whose body never started: nothing will release it
    gc.collect()
    assert adm.shares.total == 0


def test_limits_defaults_and_validation():
    sched = SimpleNamespace(max_num_seqs=8, max_num_batched_tokens=512, max_model_len=1024)
    lim = CapacityLimits.defaults(sched)
    assert (lim.max_num_queued_reqs, lim.max_num_queued_tokens, lim.max_queue_wait) == (24, 24 * 1024, 5.0)
    lim = CapacityLimits.defaults(sched, 4, 100, 2.5)
    assert (lim.max_num_queued_reqs, lim.max_num_queued_tokens, lim.max_queue_wait) == (4, 100, 2.5)
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="max_queue_wait"):
            CapacityLimits(4, 100, bad)


def test_every_way_a_job_ends_in_the_server_releases_its_share(tmp_path):
    import asyncio

    from tokenmill.engine.async_engine import EngineDeadError
    from tokenmill.server.openai import Job as ServedJob
    from tokenmill.server.openai import OpenAIServing

    adm = make_admission(tmp_path, CapacityLimits(8, 10**6))
    serving = OpenAIServing(adm)

    async def failing():
        raise EngineDeadError("the engine failed")
        yield  # an async generator

    async def endless(rid: str):
        from tokenmill.outputs import CompletionOutput, RequestOutput

        while True:
            await asyncio.sleep(0.01)
            yield RequestOutput(rid, None, [1, 2, 3], None, [CompletionOutput(0, "x", [5], None, None)], False)

    async def consume(gen, stop_after=None):
        n = 0
        async for _ in gen:
            n += 1
            if stop_after is not None and n >= stop_after:
                break
        await gen.aclose()

    failed = ServedJob("fails", [1, 2, 3], SamplingParams(max_tokens=4), 0)
    adm.admit(key("a"), [failed])
    with pytest.raises(EngineDeadError):
        asyncio.run(consume(serving._run(failed, failing())))
    assert adm.shares.total == 0

    jobs = [ServedJob(f"p{i}", [1, 2, 3], SamplingParams(max_tokens=4), i) for i in range(3)]
    adm.admit(key("a"), jobs)
    serving.engine.generate_batch = lambda reqs: [endless(r[0]) for r in reqs]
    asyncio.run(consume(serving.run_all(jobs), stop_after=2))  # the client went away mid-way
    assert adm.shares.total == 0 and adm.shares.snapshot() == {}


def test_precheck_refuses_a_full_server_before_the_prompt_is_read_and_admits_nothing(tmp_path):
    adm = make_admission(tmp_path, CapacityLimits(2, 10**6, max_queue_wait=1e9))
    adm.probe.view = busy(0, 0)
    adm.precheck(key("a"))  # room: nothing said, nothing entered
    assert adm.shares.total == 0
    adm.admit(key("a"), [job("j0")])
    adm.admit(key("a"), [job("j1")])
    with pytest.raises(Refusal, match=r"2 requests in progress \(limit 2\)") as exc:
        adm.precheck(key("a"))
    assert exc.value.status == 503 and exc.value.retry_after >= 1 and adm.shares.total == 2
    adm.precheck({"authorization": "Bearer wrong"})  # left to admit(), which answers 401 in its order
    with pytest.raises(Refusal) as auth:
        adm.admit({"authorization": "Bearer wrong"}, [job("j2")])
    assert auth.value.status == 401
