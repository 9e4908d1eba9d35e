"""`tokenmill bench spec`: its workloads, batching, configs and summary maths (no model runs)."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from tokenmill.bench import spec
from tokenmill.spec_decode.config import SpeculativeConfig
from tokenmill.spec_decode.ngram import NgramProposer

HELDOUT = Path(__file__).resolve().parents[1] / "data" / "demo_heldout.txt"


def test_passages_are_bounded_and_open_differently():
    ps = spec.passages(HELDOUT.read_text(), 8)
    assert len(ps) == 8 and all(300 <= len(p) <= 700 for p in ps)
    assert len({spec.opening(p) for p in ps}) == 8
    assert spec.opening("a  b\nc d e f", 3) == "a  b\nc" and spec.opening("two words", 5) == "two words"


def test_typos_swap_letters_of_every_seventh_long_word():
    text = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
    assert spec.with_typos(text) == "one two three four five six sveen eight nine ten eleven twelve thirteen fuorteen"
    assert spec.with_typos("a b c d e f ggg") == "a b c d e f ggg"  # too short to change


def test_text_workloads_hold_the_passage_and_start_its_answer():
    text = HELDOUT.read_text()
    work, ps = spec.text_workloads(text, 4), spec.passages(text, 4)
    rep, free = work["repetitive"], work["free"]
    assert rep[0].startswith("Repeat") and ps[0] in rep[0] and rep[0].endswith("\n\n" + spec.opening(ps[0], 4))
    assert rep[1].startswith("Fix") and spec.with_typos(ps[1]) in rep[1] and ps[1] not in rep[1]
    assert free == [spec.opening(p) for p in ps]
    with pytest.raises(ValueError, match="passages"):
        spec.text_workloads("too short", 1)


def test_token_workloads_repeat_a_segment_the_ngram_proposer_finds():
    work = spec.token_workloads(4096, 3, seed=1, segment=8, times=3)
    for rep, free in zip(work["repetitive"], work["free"]):
        assert len(rep) == len(free) == 24 and rep[:8] * 3 == rep and all(3 <= t < 4096 for t in rep + free)
        assert NgramProposer(2, 4).propose(rep, 4) == rep[:4]  # the segment starts over
    assert spec.token_workloads(4096, 3, seed=1, segment=8, times=3) == work


def test_batches_run_at_least_min_prompts():
    prompts = list(range(8))
    assert spec.batches(prompts, 1) == [[0], [1]][:spec.MIN_PROMPTS] and spec.MIN_PROMPTS == 2
    assert spec.batches(prompts, 8) == [prompts]
    assert spec.batches(prompts, 4) == [[0, 1, 2, 3]]
    with pytest.raises(ValueError):
        spec.batches(prompts[:3], 4)


def test_each_way_is_a_valid_speculative_config():
    args = argparse.Namespace(num_speculative_tokens=3, prompt_lookup_min=2, prompt_lookup_max=4)
    assert spec.spec_config("none", args, "/d") is None and spec.spec_config("none-again", args, "/d") is None
    methods = {}
    for way in [w for w in spec.WAYS if not w.startswith("none")]:
        c = SpeculativeConfig.parse(spec.spec_config(way, args, "/d"))
        assert c.num_speculative_tokens == 3
        methods[way] = (c.method, c.model, c.uses_ngram)
    assert methods == {"ngram": ("ngram", None, True), "draft": ("draft_model", "/d", False),
                       "auto-ngram": ("auto", None, True), "auto-draft": ("auto", "/d", False)}


def test_mismatch_copy_share_and_acceptance_maths():
    assert spec.first_mismatch([1, 2, 3], [1, 2, 3]) is None
    assert spec.first_mismatch([1, 2, 3], [1, 9, 3]) == 1
    assert spec.first_mismatch([1, 2], [1, 2, 3]) == 2
    assert spec.copied_share([1, 2, 3, 4, 5, 6], [3, 4, 5, 6, 9], n=4) == 0.5
    assert spec.copied_share([1, 2, 3], [1, 2], n=4) == 0.0
    a = spec.acceptance((10, 40, 25, 12, 3))
    assert a == dict(num_drafts=10, acceptance_rate=0.625, mean_accepted_length=3.5,
                     steps_with_proposals=12, steps_without=3)
    assert spec.acceptance((0,) * 5)["mean_accepted_length"] == 0.0


def _row(way: str, runs: list[float], workload="repetitive", batch=1, mismatches=()) -> dict:
    return dict(model="demo", workload=workload, batch=batch, way=way, runs=runs, cpu_runs=[2 * x for x in runs],
                mismatches=list(mismatches),
                copied=0.5, ms_per_step=2.0, tokens_per_step=1.5, acceptance_rate=0.5, mean_accepted_length=2.0,
                steps_with_proposals=1, steps_without=2)


def test_summary_takes_medians_and_checks_the_goals():
    rows = [_row("none", [100, 10, 110]), _row("ngram", [250, 190, 1]), _row("auto-ngram", [104, 96, 99]),
            _row("none", [200, 200, 200], batch=8), _row("auto-draft", [180, 300, 150], batch=8),
            _row("none-again", [190, 210, 230], batch=8)]
    spec.summarize(rows)
    assert [r["tokens_per_s"] for r in rows] == [100, 190, 99, 200, 180, 210]
    # Ratios pair each run with none's run of the same repeat: ngram's are 2.5, 19 and 0.009.
    assert [round(r["ratio"], 3) for r in rows] == [1, 2.5, 1.04, 1, 0.9, 1.05]
    assert [r["cpu_tokens_per_s"] for r in rows] == [200, 380, 198, 400, 360, 420] and rows[1]["cpu_ratio"] == 2.5
    g = spec.goals(rows)
    assert [x["passed"] for x in g] == [True, False]
    assert "auto-draft" in g[1]["goal"] and "batch 8; none-again there: 1.05x" in g[1]["goal"]
    assert g[1]["gap"] == pytest.approx(0.05) and g[0]["gap"] == 0
    rows[1]["mismatches"] = [dict(prompt=0, position=5, repeat=0)]  # fast but not identical: a miss
    assert not spec.goals(rows)[0]["passed"]


def test_report_and_plot(tmp_path, capsys):
    rows = [_row(w, [100.0 + i]) for i, w in enumerate(spec.WAYS)]
    rows[1]["mismatches"] = [dict(prompt=1, position=7, repeat=0)]
    spec.summarize(rows)
    result = dict(models=[dict(name="demo", model="m", params=5e6, draft_params=2e6, layers=6, draft_layers=2)],
                  rows=rows, goals=spec.goals(rows), threads=2, max_tokens=64, num_speculative_tokens=4,
                  prompt_lookup=[2, 4], repeats=1)
    spec._print(result)
    out = capsys.readouterr().out
    assert "MISMATCH (1 prompts, first at token 7)" in out and "MISS  demo: ngram" in out and "PASS  auto" in out
    spec._plot(result, tmp_path / "spec.png")
    assert (tmp_path / "spec.png").stat().st_size > 1000
