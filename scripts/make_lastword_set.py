#!/usr/bin/env python
"""Build a LAMBADA-format last-word set from the demo model's held-out text.

LAMBADA (Paperno et al., 2016) is a JSONL file, one `{"text": "..."}` per line; the task is to
predict the passage's last word from everything before it. This script makes the same kind of
file from `data/demo_heldout.txt` (text the demo model never trained on), so
`tokenmill eval lastword` has a set to run on without any download.

How a passage is made (deterministic: the same input and --seed give the same file):

1. The held-out text is split into words on whitespace (so newlines and indentation collapse to
   single spaces inside a passage).
2. Windows start at word 0 and advance by a stride drawn uniformly from [--stride-min,
   --stride-max] words; each window's length is drawn uniformly from [--min-words, --max-words].
   Both draws come from one `random.Random(--seed)`.
3. The last word of a window is the target. It must be a plain alphabetic word of at least
   --min-target-len letters once trailing punctuation is stripped ("returned." -> "returned";
   "x", "2", "foo()" or "(bar" do not qualify). If the window's last word does not qualify, the
   end moves forward to the next qualifying word, at most --max-extend words; otherwise the window
   is skipped.
4. The passage is the window's words joined by single spaces, with the target's trailing
   punctuation removed, so the text ends in the target word exactly as LAMBADA's passages do.
   Exact duplicate passages are dropped.

Usage:
    python scripts/make_lastword_set.py                      # writes data/demo_lastword.jsonl
    python scripts/make_lastword_set.py --seed 1 --out /tmp/x.jsonl
"""
from __future__ import annotations

import argparse
import json
import logging
import random
import re
import sys
from pathlib import Path

logger = logging.getLogger("make_lastword_set")

REPO = Path(__file__).resolve().parents[1]
TRAILING_PUNCT = re.compile(r"[^\w]+$")


def target_word(word: str, min_len: int) -> str | None:
    """The word with trailing punctuation stripped if it is a plain alphabetic word of >= min_len letters."""
    stripped = TRAILING_PUNCT.sub("", word)
    if len(stripped) >= min_len and stripped.isascii() and stripped.isalpha():
        return stripped
    return None


def make_passages(text: str, *, seed: int = 0, min_words: int = 30, max_words: int = 60, stride_min: int = 8,
                  stride_max: int = 10, min_target_len: int = 3, max_extend: int = 10) -> list[str]:
    if not 1 <= min_words <= max_words:
        raise ValueError("need 1 <= --min-words <= --max-words")
    if not 1 <= stride_min <= stride_max:
        raise ValueError("need 1 <= --stride-min <= --stride-max")
    words = text.split()
    rng = random.Random(seed)
    passages: list[str] = []
    seen: set[str] = set()
    skipped = dupes = 0
    start = 0
    while True:
        length = rng.randint(min_words, max_words)
        stride = rng.randint(stride_min, stride_max)
        end = start + length  # exclusive
        if end > len(words):
            break
        for last in range(end - 1, min(end - 1 + max_extend, len(words) - 1) + 1):
            target = target_word(words[last], min_target_len)
            if target is not None:
                passage = " ".join(words[start:last] + [target])
                if passage in seen:
                    dupes += 1
                else:
                    seen.add(passage)
                    passages.append(passage)
                break
        else:
            skipped += 1
        start += stride
    logger.info("%d words -> %d passages (%d windows skipped: no qualifying last word; %d duplicates dropped)",
                len(words), len(passages), skipped, dupes)
    return passages


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default=str(REPO / "data" / "demo_heldout.txt"), help="held-out text file")
    p.add_argument("--out", default=str(REPO / "data" / "demo_lastword.jsonl"), help="JSONL file to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-words", type=int, default=30)
    p.add_argument("--max-words", type=int, default=60)
    p.add_argument("--stride-min", type=int, default=8)
    p.add_argument("--stride-max", type=int, default=10)
    p.add_argument("--min-target-len", type=int, default=3)
    p.add_argument("--max-extend", type=int, default=10,
                   help="how far the end may move to reach a qualifying last word")
    p.add_argument("--min-passages", type=int, default=1000, help="fail if fewer passages come out")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")

    src = Path(args.input)
    if not src.is_file():
        logger.error("input not found: %s", src)
        return 2
    passages = make_passages(src.read_text(encoding="utf-8"), seed=args.seed, min_words=args.min_words,
                             max_words=args.max_words, stride_min=args.stride_min, stride_max=args.stride_max,
                             min_target_len=args.min_target_len, max_extend=args.max_extend)
    if len(passages) < args.min_passages:
        logger.error("only %d passages (< --min-passages %d)", len(passages), args.min_passages)
        return 1
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as f:
        for passage in passages:
            f.write(json.dumps({"text": passage}, ensure_ascii=False) + "\n")
    logger.info("wrote %d passages to %s", len(passages), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
