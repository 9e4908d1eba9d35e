"""`tokenmill bench structured` end to end on the demo model, with tiny settings."""
from __future__ import annotations

import json
import re

import pytest

from tokenmill.bench.structured import CHOICES, REGEXES, SCHEMAS, _check
from tokenmill.cli import main
from tokenmill.structured.grammars import unsupported_schema_part


def test_bench_structured_writes_report(tmp_path, capsys):
    n = len(SCHEMAS) + len(REGEXES) + len(CHOICES)  # every constraint once
    argv = ["bench", "structured", "--num-prompts", str(n), "--batch-size", "2", "--decode-tokens", "6",
            "--repeats", "1", "--result-dir", str(tmp_path)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^decode tok/s, batch 2, json +\d+\.\d +\d+\.\d +\d+\.\d\dx$", printed, re.M)
    assert re.search(r"^TTFT ms, cached vs new schema +\d+\.\d +\d+\.\d +\d+\.\d\dx$", printed, re.M)
    assert "validity 100.0% (goal 100%)" in printed
    r = json.loads((tmp_path / "structured.json").read_text())
    assert (tmp_path / "structured.png").stat().st_size > 0
    v = r["validity"]
    assert v["validity"] == 1.0 and v["total"] == n
    assert {k: c["total"] for k, c in v["by_kind"].items()} == {"json": len(SCHEMAS), "regex": len(REGEXES),
                                                                "choice": len(CHOICES)}
    assert all(c["length_finished"] == 0 for c in v["by_kind"].values())
    assert set(v["by_constraint"]) == {f"json: {s}" for s in SCHEMAS} | {f"regex: {s}" for s in REGEXES} | {
        f"choice: {s}" for s in CHOICES}
    d = r["decode"]
    assert set(d["tokens_per_s"]) == {"unconstrained", "json", "regex"} and set(d["ratio"]) == {"json", "regex"}
    assert all(t > 0 for t in d["tokens_per_s"].values()) and all(len(x) == 1 for x in d["runs"].values())
    assert all(ms >= 0 for ms in d["mask_ms_per_step"].values())
    t = r["ttft"]
    assert t["cache_misses"] == 5 and t["cache_hits"] == 5  # each new schema compiled once, then reused
    assert all(s > 0 for s in t["median_s"].values()) and t["ratio_new_to_cached"] > 0


def test_schemas_are_enforceable():
    assert all(unsupported_schema_part(s) is None for s in SCHEMAS.values())


def test_check():
    s = SCHEMAS["formats"]
    good = '{"day": "2024-02-29", "id": "123e4567-e89b-12d3-a456-426614174000", "host": "10.0.0.1"}'
    assert _check("json", s, good) == (True, True)
    assert _check("json", s, good.replace("02-29", "02-30")) == (True, False)  # format is only annotated
    assert _check("json", s, good[:-1]) == (False, False)
    assert _check("json", SCHEMAS["enums"], '{"status": "gone", "priority": 1, "color": "red"}') == (False, False)
    assert _check("regex", REGEXES["phone"], "(123) 456-7890") == (True, True)
    assert _check("regex", REGEXES["phone"], "(123) 456-7890 ") == (False, False)
    assert _check("choice", CHOICES["color"], "green") == (True, True)
    assert _check("choice", CHOICES["color"], "gre") == (False, False)


@pytest.mark.parametrize("flag", ["--num-prompts", "--batch-size", "--repeats", "--max-tokens"])
def test_bad_args(flag, capsys):
    assert main(["bench", "structured", flag, "0"]) == 2
    assert "required" in capsys.readouterr().err
