"""The block manager alone: exact block ids, LRU eviction order, prefix hits, collisions, spill."""
from __future__ import annotations

from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.kv_tiers import SpillCostModel
from tokenmill.engine.sequence import Request
from tokenmill.sampling_params import SamplingParams


def seq_of(tokens: list[int]):
    return Request(str(tokens[:3]), None, list(tokens), SamplingParams()).seqs[0]


def run_prefill(bm: BlockManager, tokens: list[int]):
    """Admit a sequence as the scheduler would, compute its prompt, cache its full blocks."""
    seq = seq_of(tokens)
    hit = bm.find_prefix(seq)
    n = seq.num_tokens - hit.num_blocks() * bm.block_size
    assert bm.allocate_slots(seq, n, hit)
    seq.num_computed_tokens = seq.num_tokens
    bm.cache_full_blocks(seq)
    return seq, hit


def test_exact_ids_without_caching():
    bm = BlockManager(num_blocks=6, block_size=4, enable_prefix_caching=False)
    seq = seq_of(list(range(10)))
    assert bm.allocate_slots(seq, 10) and seq.block_table == [0, 1, 2]
    seq.num_computed_tokens = 10
    assert bm.allocate_slots(seq, 2) and seq.block_table == [0, 1, 2]  # slots 10, 11 fit block 2
    assert bm.allocate_slots(seq, 3) and seq.block_table == [0, 1, 2, 3]
    other = seq_of(list(range(9)))
    assert not bm.allocate_slots(other, 9)  # needs 3, only 2 free: nothing taken
    assert bm.num_free_blocks == 2 and other.block_table == []
    bm.free(seq)
    assert bm.num_free_blocks == 6 and seq.block_table == []
    assert bm.allocate_slots(other, 9) and other.block_table == [0, 1, 2]


def test_lru_eviction_order_by_block_id():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, _ = run_prefill(bm, list(range(100, 109)))  # 9 tokens: blocks 0, 1 full, 2 partial
    assert a.block_table == [0, 1, 2] and bm.num_cached_blocks == 2
    bm.free(a)
    # The partial block holds nothing reusable: first out. A's tail before its head.
    assert list(bm.free_queue) == [2, 3, 4, 5, 6, 7, 1, 0]
    b, _ = run_prefill(bm, list(range(200, 209)))
    assert b.block_table == [2, 3, 4]
    bm.free(b)
    assert list(bm.free_queue) == [4, 5, 6, 7, 1, 0, 3, 2]
    c, _ = run_prefill(bm, list(range(300, 324)))  # 6 fresh blocks: evicts A (older), keeps B
    assert c.block_table == [4, 5, 6, 7, 1, 0]
    assert bm.stats.evictions == 2
    bm.free(c)
    again_b, hit = run_prefill(bm, list(range(200, 209)))
    assert hit.items == [2, 3] and again_b.block_table[:2] == [2, 3]
    bm.free(again_b)
    _, hit = run_prefill(bm, list(range(100, 109)))
    assert hit.items == []  # A's blocks were evicted


def test_hit_leaves_last_token_and_shares_blocks():
    bm = BlockManager(num_blocks=10, block_size=4)
    a, _ = run_prefill(bm, list(range(8)))  # exactly 2 full blocks
    b = seq_of(list(range(8)))
    hit = bm.find_prefix(b)
    assert hit.items == [a.block_table[0]]  # the last block is recomputed to get logits
    assert bm.allocate_slots(b, 4, hit) and b.num_computed_tokens == 4
    assert bm.ref_counts[a.block_table[0]] == 2
    assert bm.stats.queries == 16 and bm.stats.hits == 4


def test_cached_prefix_tokens_agrees_with_find_prefix_and_reads_only():
    bm = BlockManager(num_blocks=10, block_size=4)
    a, _ = run_prefill(bm, list(range(12)))  # 3 full blocks cached
    bm.free(a)  # still cached, now evictable
    for tokens in (list(range(12)), list(range(13)), list(range(9)) + [99, 98], [7] + list(range(12)), [1]):
        keys: list[int] = []
        expect = bm.find_prefix(seq_of(tokens)).num_blocks() * 4
        assert bm.cached_prefix_tokens(tokens, keys) == expect, tokens
        assert bm.cached_prefix_tokens(tokens, keys) == expect  # from the memoised chain
    assert bm.num_free_blocks == 10 and not any(bm.ref_counts)  # nothing was allocated or held
    assert BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=False).cached_prefix_tokens(
        list(range(12))) == 0


def test_forced_hash_collision_never_serves_other_kv():
    bm = BlockManager(num_blocks=10, block_size=4, hash_fn=lambda parent, tokens: 42)
    a, _ = run_prefill(bm, [1, 2, 3, 4, 5, 6, 7, 8, 9])
    b, hit = run_prefill(bm, [9, 9, 9, 9, 5, 6, 7, 8, 1])
    assert hit.items == []  # same key, other tokens: a miss
    # Same tokens in block 1 but a different block 0: the parent check refuses it.
    bm2 = BlockManager(num_blocks=10, block_size=4, hash_fn=lambda parent, tokens: hash(tokens))
    run_prefill(bm2, [1, 2, 3, 4, 5, 6, 7, 8, 0])
    _, hit = run_prefill(bm2, [0, 0, 0, 0, 5, 6, 7, 8, 0])
    assert hit.items == []
    _, hit = run_prefill(bm2, [1, 2, 3, 4, 5, 6, 7, 8, 3])
    assert len(hit.items) == 2


def test_spill_tier_keeps_evicted_blocks_and_copies_back():
    cheap_copy = SpillCostModel(kv_bytes_per_token=1000, flops_per_token=1e9, link_bandwidth=1e10, device_flops=1e11)
    bm = BlockManager(num_blocks=4, block_size=4, num_spill_blocks=4, cost_model=cheap_copy)
    a, _ = run_prefill(bm, list(range(100, 109)))  # blocks 0, 1 cached
    bm.free(a)
    c, _ = run_prefill(bm, list(range(300, 316)))  # needs all 4 blocks: evicts 1 then 0 to the spill tier
    assert bm.take_copies() == [("out", 1, 0), ("out", 0, 1)]
    assert bm.stats.swaps_out == 2 and bm.spill.num_used_blocks == 2
    bm.free(c)
    _, hit = run_prefill(bm, list(range(100, 109)))
    assert hit.num_spilled == 2
    copies = bm.take_copies()
    ins = [(i, c) for i, c in enumerate(copies) if c[0] == "in"]
    # A's first block went to spill block 1, its second to spill block 0; each comes back into
    # the device block just freed for it (whose own cached content was spilled first).
    assert [c[1] for _, c in ins] == [1, 0]
    for i, c in ins:
        assert copies[i - 1][0] == "out" and copies[i - 1][1] == c[2]
    assert bm.stats.swaps_in == 2 and bm.stats.recomputed_tokens == 0
    # When recomputing is cheaper, the spilled block is not used.
    slow_link = SpillCostModel(kv_bytes_per_token=10**6, flops_per_token=1.0, link_bandwidth=1.0, device_flops=1e12)
    assert not slow_link.swap_in_is_cheaper(4)


def test_copy_back_survives_a_full_spill_tier():
    """Taking device blocks for a spilled hit evicts other cached blocks into a full spill tier;
    the hit's own spilled blocks are reserved and must not be pushed out (a found regression)."""
    cheap_copy = SpillCostModel(kv_bytes_per_token=1, flops_per_token=1e9)
    bm = BlockManager(num_blocks=3, block_size=2, num_spill_blocks=2, cost_model=cheap_copy)
    a, _ = run_prefill(bm, [1, 2, 3, 4, 5])
    bm.free(a)
    b, _ = run_prefill(bm, [5, 6, 7, 8, 9, 10])  # spills A's two blocks: the tier is now full
    bm.free(b)
    bm.take_copies()
    c, hit = run_prefill(bm, [1, 2, 3, 4, 11])
    assert hit.num_spilled == 2 and len(c.block_table) == 3
    copies = bm.take_copies()
    ins = [x for x in copies if x[0] == "in"]
    assert [x[1] for x in ins] == [1, 0]  # A's first block sits in spill slot 1, its second in 0
    # No content is copied out into a slot whose copy back has not been queued before it.
    for i, (direction, _, dst) in enumerate(copies):
        if direction == "out":
            assert all(copies.index(x) < i for x in ins if x[1] == dst)
    assert bm.spill.num_used_blocks + len(bm.spill.free) == 2
