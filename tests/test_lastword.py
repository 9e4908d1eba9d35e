"""`tokenmill eval lastword`: the shipped LAMBADA-format set, the scoring rule, and transformers/tokenmill agreement."""
from __future__ import annotations

import argparse
import json
import re

import pytest
import torch

from tokenmill.bench import lastword
from tokenmill.bench.lastword import (DEFAULT_DATA, DEMO_MODEL, add_args, evaluate_tokenmill, evaluate_transformers,
                                      load_passages, predict_word, prepare, run, split_passage)

SLICE = 48


def test_shipped_set_is_lambada_format():
    lines = open(DEFAULT_DATA, encoding="utf-8").read().splitlines()
    assert len(lines) >= 1000
    for line in lines:
        obj = json.loads(line)
        assert isinstance(obj, dict) and isinstance(obj["text"], str)
        assert obj["text"] == " ".join(obj["text"].split())  # whitespace collapsed
        context, target = split_passage(obj["text"])
        assert re.fullmatch(r"[A-Za-z]{3,}", target), target
        assert len(context.split()) >= 29
    assert load_passages(DEFAULT_DATA) == [json.loads(line)["text"] for line in lines]


def test_split_passage():
    assert split_passage("the cat sat on the mat") == ("the cat sat on the", "mat")
    assert split_passage("  a  b\n\tword ") == ("a  b", "word")
    with pytest.raises(ValueError):
        split_passage("lonely")


@pytest.mark.parametrize("generated, word", [
    (" mat.", "mat"), ("mat and more", "mat"), ("\n  returned, then", "returned"), (" don't stop", "don't"),
    (" well-known", "well-known"), (" quote' x", "quote"), (" dash- x", "dash"), (" .mat", ""), ("", ""),
    (" Mat", "Mat"), (" x_y(z)", "x_y"),
])
def test_predict_word(generated, word):
    assert predict_word(generated) == word


def test_load_passages_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a b c"}\n\n{"text": 3}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3"):
        load_passages(bad)
    bad.write_text('{"text": "a b c"}\nnot json\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        load_passages(bad)
    bad.write_text('{"text": "oneword"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1"):
        load_passages(bad)
    with pytest.raises(ValueError, match="not found"):
        load_passages(tmp_path / "missing.jsonl")
    plain = tmp_path / "plain.txt"
    plain.write_text("one two three\n\nfour five\n")
    assert load_passages(plain) == ["one two three", "four five"]


@pytest.fixture(scope="module")
def models():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokenmill import LLM

    tok = AutoTokenizer.from_pretrained(DEMO_MODEL)
    hf = AutoModelForCausalLM.from_pretrained(DEMO_MODEL, dtype=torch.float32).eval()
    return tok, hf, LLM(DEMO_MODEL, dtype="float32")


def test_both_paths_agree_on_a_slice(models):
    tok, hf, llm = models
    examples = prepare(tok, load_passages(DEFAULT_DATA)[:SLICE])
    assert prepare(llm.get_tokenizer(), load_passages(DEFAULT_DATA)[:SLICE]) == examples
    hf_c, hf_n, hf_t, hf_preds = evaluate_transformers(hf, tok, examples, batch_size=16, max_new_tokens=8,
                                                       progress=False)
    tm_c, tm_n, tm_t, tm_preds = evaluate_tokenmill(llm, examples, max_new_tokens=8, progress=False)
    assert hf_n == tm_n == SLICE and hf_t > 0 and tm_t > 0
    assert hf_preds == tm_preds  # identical predictions, so identical counts
    assert hf_c == tm_c == sum(p == ex.target for p, ex in zip(hf_preds, examples))
    assert hf_c > 0  # the demo model gets some right
    # EOS handling is exercised: passage 36 of the set ends in EOS within 8 tokens (transformers' batch
    # output is cut at the first EOS, tokenmill stops there) and its row is left-padded in its batch.
    from tokenmill import SamplingParams

    out = llm.generate([{"prompt_token_ids": examples[36].context_ids}], SamplingParams(temperature=0, max_tokens=8),
                       use_tqdm=False)[0].outputs[0].token_ids
    assert out[-1] == tok.eos_token_id and len(out) < 8
    assert len(examples[36].context_ids) < max(len(ex.context_ids) for ex in examples[32:48])


def test_run_writes_json(tmp_path, capsys):
    p = argparse.ArgumentParser()
    add_args(p)
    out = tmp_path / "r.json"
    assert run(p.parse_args(["--limit", "5", "--batch-size", "4", "--max-new-tokens", "3", "--json", str(out)])) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^transformers: Accuracy: \d+\.\d\d% \(\d+/5\) \(elapsed time: \d+\.\d sec\)$", printed, re.M)
    assert re.search(r"^tokenmill:    Accuracy: \d+\.\d\d% \(\d+/5\) \(elapsed time: \d+\.\d sec\)$", printed, re.M)
    assert re.search(r"^time ratio: \d+\.\d\dx \(transformers / tokenmill\)$", printed, re.M)
    r = json.loads(out.read_text())
    for key in ("model", "data", "num_passages", "max_new_tokens", "batch_size", "transformers", "tokenmill",
                "time_ratio", "accuracy_diff_points", "disagreements"):
        assert key in r
    assert r["num_passages"] == 5 and r["max_new_tokens"] == 3 and r["batch_size"] == 4
    for side in ("transformers", "tokenmill"):
        assert set(r[side]) >= {"accuracy", "correct", "total", "elapsed_s"}
        assert r[side]["total"] == 5
    assert r["accuracy_diff_points"] == pytest.approx(r["tokenmill"]["accuracy"] - r["transformers"]["accuracy"])


@pytest.mark.parametrize("argv, match", [
    (["--data", "/nonexistent.jsonl"], "not found"),
    (["/nonexistent-model"], "model folder"),
    (["--batch-size", "0"], "batch-size"),
    (["--limit", "0"], "limit"),
    (["--max-new-tokens", "0"], "max-new-tokens"),
])
def test_run_bad_args(argv, match):
    p = argparse.ArgumentParser()
    add_args(p)
    with pytest.raises(ValueError, match=match):
        run(p.parse_args(argv))


def test_run_empty_data(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    p = argparse.ArgumentParser()
    add_args(p)
    with pytest.raises(ValueError, match="no passages"):
        run(p.parse_args(["--data", str(empty)]))


def test_defaults_point_at_shipped_files():
    assert (lastword.Path(DEMO_MODEL) / "config.json").is_file()
    assert lastword.Path(DEFAULT_DATA).is_file()
