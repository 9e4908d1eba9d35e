"""`tokenmill eval lastword`: LAMBADA-style last-word accuracy, through transformers and through tokenmill.

As in the FasterTransformer + Triton write-up, the same model answers the same passages twice in
one run -- once through transformers' `generate`, once through the engine -- and each path prints
`Accuracy: X% (correct/total) (elapsed time: T sec)`.

The task (LAMBADA, Paperno et al. 2016): each passage is `{"text": ...}`; predict its last word
from the rest.

- split: context = the text before its last run of whitespace, target = the last word.
- input: `tokenizer(context).input_ids` (the HF tokenizer's defaults, so a BOS is there only if the
  tokenizer adds one by default), computed once and given to both paths.
- generation: greedy, at most `max_new_tokens` (default 8) new tokens; generation stops at EOS on
  both paths (transformers' output is cut at the first EOS, as tokenmill stops there).
- prediction: the generated ids are decoded with the same tokenizer (`skip_special_tokens=True`)
  on both paths; the predicted word is the first match of `^\\s*(\\w[\\w'-]*)` (leading whitespace
  skipped; the word runs over letters, digits, `_`, `'` and `-`, so trailing punctuation such as
  "." "," ")" is left out), with any trailing `'`/`-` stripped. No match -> "" (wrong).
- correct iff prediction == target, case-sensitive, as LAMBADA is scored.

transformers runs left-padded batches of --batch-size in file order, with attention masks; tokenmill
gets every prompt at once and batches continuously. Timing covers the generation loop and the
decoding of the outputs, not model loading or tokenizing the contexts; both paths get a one-prompt
warm-up first. JSON (--json): accuracy is in percent; accuracy_diff_points = tokenmill - transformers;
time_ratio = transformers elapsed / tokenmill elapsed.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, Union

from tqdm import tqdm

from tokenmill.config import eos_token_ids
from tokenmill.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

DEMO_MODEL = str(Path(__file__).resolve().parents[1] / "demo_model")
DEFAULT_DATA = str(Path(__file__).resolve().parents[2] / "data" / "demo_lastword.jsonl")
WORD_RE = re.compile(r"^\s*(\w[\w'-]*)")
_SPLIT_RE = re.compile(r"^(.*\S)\s+(\S+)$", re.S)


@dataclass(frozen=True)
class Example:
    context_ids: list[int]
    target: str


def load_passages(path: Union[str, Path]) -> list[str]:
    """Passages from a LAMBADA-format JSONL file (one {"text": ...} object per line; blank lines skipped).

    A `.txt` file is read as one passage per line (LAMBADA's plain-text release).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"data file not found: {str(path)!r}")
    passages = []
    plain = path.suffix == ".txt"
    with path.open(encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            if plain:
                text = line.strip()
            else:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                    raise ValueError(f"{path}:{lineno}: expected a JSON object with a string \"text\"")
                text = obj["text"].strip()
            if _SPLIT_RE.match(text) is None:
                raise ValueError(f"{path}:{lineno}: a passage needs at least two words (context and target)")
            passages.append(text)
    return passages


def split_passage(text: str) -> tuple[str, str]:
    """(context, target): the text before its last whitespace (no trailing space), and the last word."""
    m = _SPLIT_RE.match(text.strip())
    if m is None:
        raise ValueError(f"a passage needs at least two words, got {text!r}")
    return m.group(1), m.group(2)


def predict_word(generated: str) -> str:
    """The first word of the generated text (leading whitespace skipped, trailing punctuation left out)."""
    m = WORD_RE.match(generated)
    return m.group(1).rstrip("'-") if m else ""


def prepare(tokenizer: Any, passages: Sequence[Union[str, Example]]) -> list[Example]:
    """Tokenize each passage's context once; Examples pass through unchanged."""
    out = []
    for p in passages:
        if isinstance(p, Example):
            out.append(p)
        else:
            context, target = split_passage(p)
            out.append(Example(list(tokenizer(context).input_ids), target))
    return out


def _score(tokenizer: Any, examples: list[Example], generated: list[list[int]]) -> tuple[int, list[str]]:
    preds = [predict_word(tokenizer.decode(ids, skip_special_tokens=True)) for ids in generated]
    return sum(p == ex.target for p, ex in zip(preds, examples)), preds


def evaluate_transformers(model: Any, tokenizer: Any, passages: Sequence[Union[str, Example]], batch_size: int = 16,
                          max_new_tokens: int = 8, progress: bool = True,
                          warmup: bool = True) -> tuple[int, int, float, list[str]]:
    """(correct, total, elapsed seconds, predictions) through transformers' greedy `generate`."""
    import torch

    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be >= 1")
    examples = prepare(tokenizer, passages)
    if not examples:
        raise ValueError("no passages")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        pad = 0
    eos = eos_token_ids(model.generation_config, model.config, tokenizer)
    device = next(model.parameters()).device

    def run_batch(batch: list[list[int]]) -> list[list[int]]:
        width = max(len(ids) for ids in batch)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                                 do_sample=False, pad_token_id=pad)
        result = []
        for row in out[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in eos), None)
            result.append(row if cut is None else row[:cut + 1])  # keep the EOS, as tokenmill does
        return result

    if warmup:
        run_batch([examples[0].context_ids[:8]])
    t0 = time.perf_counter()
    generated: list[list[int]] = []
    with tqdm(total=len(examples), desc="transformers", unit="passage", disable=not progress) as bar:
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            generated.extend(run_batch([ex.context_ids for ex in chunk]))
            bar.update(len(chunk))
    correct, preds = _score(tokenizer, examples, generated)
    elapsed = time.perf_counter() - t0
    return correct, len(examples), elapsed, preds


def evaluate_tokenmill(llm: Any, passages: Sequence[Union[str, Example]], max_new_tokens: int = 8,
                       progress: bool = True, warmup: bool = True) -> tuple[int, int, float, list[str]]:
    """(correct, total, elapsed seconds, predictions) through tokenmill: every prompt submitted at once."""
    from tokenmill import SamplingParams

    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    tokenizer = llm.get_tokenizer()
    examples = prepare(tokenizer, passages)
    if not examples:
        raise ValueError("no passages")
    params = SamplingParams(temperature=0, max_tokens=max_new_tokens)
    if warmup:
        llm.generate([{"prompt_token_ids": examples[0].context_ids[:8]}], params, use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": ex.context_ids} for ex in examples], params, use_tqdm=progress)
    correct, preds = _score(tokenizer, examples, [list(o.outputs[0].token_ids) for o in outs])
    elapsed = time.perf_counter() - t0
    return correct, len(examples), elapsed, preds


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=DEMO_MODEL, help="checkpoint folder (default: the bundled demo model)")
    p.add_argument("--data", default=DEFAULT_DATA,
                   help="LAMBADA-format JSONL, one {\"text\": ...} per line (default: data/demo_lastword.jsonl)")
    p.add_argument("--batch-size", type=int, default=16, help="transformers batch size (tokenmill batches itself)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N passages")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--json", default=None, metavar="PATH", help="also write the results as JSON")


def _line(name: str, correct: int, total: int, elapsed: float) -> str:
    return (f"{name + ':':<14}Accuracy: {100 * correct / total:.2f}% ({correct}/{total}) "
            f"(elapsed time: {elapsed:.1f} sec)")


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tokenmill import LLM

    model_dir = args.model or DEMO_MODEL
    if not (Path(model_dir) / "config.json").is_file():
        raise ValueError(f"model folder not found (no config.json): {model_dir!r}")
    if args.batch_size < 1:
        raise ValueError("--batch-size must be >= 1")
    if args.max_new_tokens < 1:
        raise ValueError("--max-new-tokens must be >= 1")
    if args.limit is not None and args.limit < 1:
        raise ValueError("--limit must be >= 1")
    passages = load_passages(args.data)
    if args.limit:
        passages = passages[:args.limit]
    if not passages:
        raise ValueError(f"no passages in {args.data!r}")

    tokenizer = load_tokenizer(model_dir)
    examples = prepare(tokenizer, passages)
    max_pos = getattr(AutoConfig.from_pretrained(model_dir), "max_position_embeddings", None)
    longest = max(len(ex.context_ids) for ex in examples)
    if max_pos and longest + args.max_new_tokens > max_pos:
        raise ValueError(f"the longest context has {longest} tokens; with --max-new-tokens {args.max_new_tokens} "
                         f"that exceeds the model's {max_pos} positions")
    if min(len(ex.context_ids) for ex in examples) == 0:
        raise ValueError("a passage's context tokenizes to nothing")

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, args.dtype)).eval()
    hf_correct, total, hf_elapsed, hf_preds = evaluate_transformers(hf, tokenizer, examples, args.batch_size,
                                                                    args.max_new_tokens)
    del hf
    llm = LLM(model_dir, dtype=args.dtype)
    tm_correct, _, tm_elapsed, tm_preds = evaluate_tokenmill(llm, examples, args.max_new_tokens)

    hf_acc, tm_acc = 100 * hf_correct / total, 100 * tm_correct / total
    ratio = hf_elapsed / tm_elapsed
    diffs = [i for i, (a, b) in enumerate(zip(hf_preds, tm_preds)) if a != b]
    print(_line("transformers", hf_correct, total, hf_elapsed))
    print(_line("tokenmill", tm_correct, total, tm_elapsed))
    print(f"time ratio: {ratio:.2f}x (transformers / tokenmill)")
    print(f"accuracy difference: {tm_acc - hf_acc:+.2f} points (tokenmill - transformers); "
          f"{len(diffs)} of {total} predictions differ")
    if args.json:
        result = dict(
            model=model_dir, data=str(args.data), dtype=args.dtype, num_passages=total,
            max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
            transformers=dict(accuracy=hf_acc, correct=hf_correct, total=total, elapsed_s=hf_elapsed),
            tokenmill=dict(accuracy=tm_acc, correct=tm_correct, total=total, elapsed_s=tm_elapsed),
            time_ratio=ratio, accuracy_diff_points=tm_acc - hf_acc, disagreements=len(diffs),
            disagreement_examples=[dict(index=i, target=examples[i].target, transformers=hf_preds[i],
                                        tokenmill=tm_preds[i]) for i in diffs[:20]])
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0
