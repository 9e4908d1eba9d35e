"""Incremental detokenization: no broken UTF-8 while streaming, the exact text at the end."""
from __future__ import annotations

from transformers import AutoTokenizer

from tokenmill.engine.detokenizer import IncrementalDetokenizer

TEXT = "naïve café — 你好, wörld 🎉🎉 done. Ünïcödé ∑ ok"


def test_streaming_never_emits_replacement_char(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    prompt = tok.encode("Say: ")
    ids = tok.encode(TEXT)
    # The tiny tokenizer splits multi-byte characters across tokens: the hard case.
    assert any("\ufffd" in tok.decode(ids[:i]) for i in range(1, len(ids)))
    d = IncrementalDetokenizer(tok, prompt)
    snapshots = []
    for t in ids:
        d.append(t)
        snapshots.append(d.text)
    assert all("\ufffd" not in s for s in snapshots)
    assert all(b.startswith(a) for a, b in zip(snapshots, snapshots[1:]))  # text only grows
    d.flush()
    assert d.text == TEXT == tok.decode(ids)


def test_stop_string_across_tokens_and_holdback(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tok.encode(TEXT)
    d = IncrementalDetokenizer(tok, [], stop_strings=["wörld"])
    found = None
    for t in ids:
        found = d.append(t)
        # What a stream may show never contains the start of the stop string.
        assert "wö" not in d.text[:d.visible_len(finished=False)]
        if found:
            break
    assert found == "wörld" and d.text == "naïve café — 你好, "
