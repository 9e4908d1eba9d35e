"""Train the small Llama-architecture demo model that ships with tokenmill.

The corpus is English text that every CPython install already has, so no
download is needed: the pydoc topic pages (``pydoc_data.topics``) plus the
docstrings of standard-library modules, classes and functions.  The script

1. builds and deduplicates that corpus and splits it ~95/5 by document into
   train / held-out, writing the held-out (and calibration) text to ``data/``;
2. trains a byte-level BPE tokenizer (vocab ~4096, ChatML chat template);
3. trains a ~5M-parameter ``LlamaForCausalLM`` (GQA, tied embeddings) on packed
   256-token sequences with AdamW + warmup/cosine decay;
4. reports held-out perplexity, saves model + tokenizer + ``TRAINING.json``
   into ``tokenmill/demo_model/`` and reloads them as a smoke test.

Run from the repository root (takes ~20 minutes on 2 CPU cores)::

    python scripts/train_demo_model.py
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import inspect
import io
import json
import logging
import math
import random
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import (AutoModelForCausalLM, AutoTokenizer, LlamaConfig,
                          LlamaForCausalLM, PreTrainedTokenizerFast)

logger = logging.getLogger("train_demo_model")

BOS, EOS, IM_START, IM_END = "<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"
# ChatML with Hermes-style tool calling; the committed template is the one source of it.
CHAT_TEMPLATE = (Path(__file__).resolve().parent.parent / "tokenmill/demo_model/chat_template.jinja").read_text()
# Modules whose import has side effects (opens a browser, prints, needs a display), that
# a venv may swap out (distutils -> setuptools shim), or whose docs are machine-generated
# (encodings); everything else in sys.stdlib_module_names is tried.
SKIP_MODULES = {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "ensurepip",
                "venv", "pydoc_data", "lib2to3", "distutils", "encodings"}
# Public submodules whose contents the package namespace doesn't re-export (fixed list, not a
# package walk, so the corpus doesn't depend on what else is installed or on test packages).
SUBMODULES = """asyncio.base_events asyncio.events asyncio.futures asyncio.locks asyncio.protocols
asyncio.queues asyncio.streams asyncio.subprocess asyncio.tasks asyncio.transports collections.abc
concurrent.futures concurrent.futures.process concurrent.futures.thread email.charset
email.generator email.header email.headerregistry email.message email.parser email.policy
email.utils html.parser http.client http.cookiejar http.cookies http.server importlib.abc
importlib.machinery importlib.metadata importlib.resources importlib.util json.decoder
json.encoder logging.config logging.handlers multiprocessing.connection multiprocessing.managers
multiprocessing.pool multiprocessing.shared_memory multiprocessing.synchronize os.path
sqlite3.dbapi2 unittest.case unittest.loader unittest.mock unittest.result unittest.runner
unittest.suite urllib.error urllib.parse urllib.request urllib.robotparser wsgiref.handlers
wsgiref.headers wsgiref.simple_server wsgiref.util wsgiref.validate xml.dom.minidom
xml.dom.pulldom xml.etree.ElementTree xml.sax.handler xml.sax.saxutils xml.sax.xmlreader
xmlrpc.client xmlrpc.server""".split()
CALIBRATION_LIMIT = 8 * 1024 * 1024
MIN_DOC_CHARS = 40  # drops boilerplate one-liners such as "Return self==value."


def normalise(text: str) -> str:
    """Light whitespace clean-up: keep indentation (code samples) but drop noise."""
    text = text.replace("\r\n", "\n").replace("\t", "    ")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def stdlib_docstrings() -> list[str]:
    """Docstrings of stdlib modules and their public classes, methods and functions."""
    docs: list[str] = []
    top = [n for n in sys.stdlib_module_names if not n.startswith("_") and n not in SKIP_MODULES]
    names = sorted(top + SUBMODULES)
    # Silence import-time chatter and deprecation warnings (e.g. typing.io) for the whole walk.
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        for name in names:
            try:
                module = importlib.import_module(name)
            except BaseException:  # noqa: BLE001 - ImportError/OSError/SystemExit all mean "skip it"
                continue
            objects: list[object] = [module]
            for attr in sorted(dir(module)):
                obj = getattr(module, attr, None)
                if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isroutine(obj)):
                    continue
                # Only objects defined in this package: skips re-exports of other modules' objects.
                if str(getattr(obj, "__module__", name)).split(".")[0] != name.split(".")[0]:
                    continue
                objects.append(obj)
                if inspect.isclass(obj):  # methods/properties only: other attributes would yield their type's doc
                    objects.extend(v for k, v in sorted(vars(obj).items()) if not k.startswith("_") and
                                   (inspect.isroutine(v) or isinstance(v, (property, classmethod, staticmethod))))
            for obj in objects:
                with contextlib.suppress(Exception):
                    if doc := inspect.getdoc(obj):
                        docs.append(doc)
    return docs


def build_corpus(seed: int, heldout_frac: float) -> tuple[list[str], list[str]]:
    """Collect, clean, deduplicate and split the corpus deterministically by document."""
    from pydoc_data.topics import topics

    raw = [topics[key] for key in sorted(topics)] + stdlib_docstrings()
    docs = [d for d in dict.fromkeys(normalise(d) for d in raw) if len(d) >= MIN_DOC_CHARS]
    random.Random(seed).shuffle(docs)
    n_held = max(1, round(len(docs) * heldout_frac))
    return docs[n_held:], docs[:n_held]


def train_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (lossless on any text), wrapped so AutoTokenizer can load it."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS, IM_START, IM_END],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    # No post-processor: encode() adds no BOS, so decode(encode(text)) == text, and
    # clean_up_tokenization_spaces=False stops decode from rewriting " ." etc.
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS,
        additional_special_tokens=[IM_START, IM_END], chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False, model_max_length=1024,
        model_input_names=["input_ids", "attention_mask"])  # Llama takes no token_type_ids


def token_stream(tokenizer: PreTrainedTokenizerFast, docs: list[str]) -> torch.Tensor:
    """Concatenate documents, each terminated by EOS, into one flat token stream."""
    ids: list[int] = []
    for enc in tokenizer.backend_tokenizer.encode_batch(docs):
        ids.extend(enc.ids + [tokenizer.eos_token_id])
    return torch.tensor(ids, dtype=torch.long)


def lr_at(step: int, max_steps: int, warmup: int, peak: float) -> float:
    """Linear warmup then cosine decay to 10% of peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def mean_nll(model: LlamaForCausalLM, ids: torch.Tensor, seq_len: int, max_windows: int | None = None) -> float:
    """Mean NLL over all predicted tokens of non-overlapping seq_len windows."""
    model.eval()
    total, count = 0.0, 0
    starts = list(range(0, len(ids) - 1, seq_len))[:max_windows]
    for start in starts:
        window = ids[start:start + seq_len].unsqueeze(0)
        if window.shape[1] < 2:
            continue
        n_pred = window.shape[1] - 1
        # HF returns the mean over the window; weight by its count so short tails aren't overweighted.
        total += model(input_ids=window, labels=window).loss.item() * n_pred
        count += n_pred
    model.train()
    return total / count


def make_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=704, num_hidden_layers=6,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024, rope_theta=10000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("tokenmill/demo_model"))
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--max-steps", type=int, default=650)
    parser.add_argument("--time-budget-min", type=float, default=22.0,
                        help="safety net only: stop early (non-reproducibly) if training runs this long")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup-steps", type=int, default=40)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    t0 = time.time()

    # Seed everything so a re-run on the same Python/torch produces identical weights.
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(True)

    train_docs, held_docs = build_corpus(args.seed, heldout_frac=0.05)
    # Files are written verbatim so perplexity can be recomputed from data/demo_heldout.txt alone.
    train_text, held_text = "\n\n".join(train_docs) + "\n", "\n\n".join(held_docs) + "\n"
    logger.info("corpus: %d train docs (%d chars), %d held-out docs (%d chars)",
                len(train_docs), len(train_text), len(held_docs), len(held_text))
    args.data_dir.mkdir(parents=True, exist_ok=True)
    (args.data_dir / "demo_heldout.txt").write_text(held_text, encoding="utf-8")
    if len(train_text.encode()) < CALIBRATION_LIMIT:
        (args.data_dir / "demo_train.txt").write_text(train_text, encoding="utf-8")
    else:  # keep the repo small: a ~2 MB prefix of the (already shuffled) train docs
        sample = train_text.encode()[:2 * 1024 * 1024].decode("utf-8", errors="ignore")
        (args.data_dir / "demo_calibration.txt").write_text(sample + "\n", encoding="utf-8")

    tokenizer = train_tokenizer(train_docs, args.vocab_size)  # train split only: no held-out leakage
    train_ids = token_stream(tokenizer, train_docs)
    # Perplexity is measured on the held-out *file* text exactly as a user would tokenize it
    # (backend tokenizer == tokenizer.encode here, minus the max-length warning).
    held_ids = torch.tensor(tokenizer.backend_tokenizer.encode(held_text).ids, dtype=torch.long)
    for text, ids in [("The Python interpreter.", tokenizer.encode("The Python interpreter.")), (held_text, held_ids)]:
        assert tokenizer.decode(ids) == text, "tokenizer does not round-trip"
    logger.info("tokens: train %d, held-out %d (vocab %d)", len(train_ids), len(held_ids), len(tokenizer))

    model = make_model(tokenizer)
    logger.info("model: %.2fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)
    # No weight decay on norm gains (1-D); matrices (incl. tied embedding) get 0.1.
    groups = [{"params": [p for p in model.parameters() if (p.dim() >= 2) == wd], "weight_decay": 0.1 * wd}
              for wd in (True, False)]
    optim = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(args.seed)
    batches: list[torch.Tensor] = []
    step, loss_ema, train_start = 0, float("nan"), time.time()
    bar = tqdm(total=args.max_steps, desc="train", unit="step")
    while step < args.max_steps:
        if (time.time() - train_start) / 60 > args.time_budget_min:
            logger.warning("time budget of %.1f min reached at step %d; stopping early", args.time_budget_min, step)
            break
        if len(batches) < args.batch_size:  # new epoch: random phase + shuffled packed windows
            offset = int(torch.randint(args.seq_len, (1,), generator=gen))
            n_seq = (len(train_ids) - offset) // args.seq_len
            seqs = train_ids[offset:offset + n_seq * args.seq_len].view(n_seq, args.seq_len)
            batches = list(seqs[torch.randperm(n_seq, generator=gen)])
        batch = torch.stack(batches[:args.batch_size])
        batches = batches[args.batch_size:]
        for group in optim.param_groups:
            group["lr"] = lr_at(step, args.max_steps, args.warmup_steps, args.lr)
        loss = model(input_ids=batch, labels=batch).loss
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        step += 1
        loss_ema = loss.item() if math.isnan(loss_ema) else 0.9 * loss_ema + 0.1 * loss.item()
        bar.update(1)
        bar.set_postfix(loss=f"{loss_ema:.3f}", lr=f"{optim.param_groups[0]['lr']:.2e}")
        if step % args.eval_every == 0:  # cheap running estimate on the first 16 held-out windows
            logger.info("step %d: train loss %.3f, held-out loss %.3f", step, loss_ema,
                        mean_nll(model, held_ids, args.seq_len, max_windows=16))
    bar.close()
    train_min = (time.time() - train_start) / 60

    held_nll = mean_nll(model, held_ids, args.seq_len)
    ppl = math.exp(held_nll)
    logger.info("held-out perplexity %.2f (nll %.4f) after %d steps, %.1f min training", ppl, held_nll, step, train_min)

    args.out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float32).save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(args.out)

    # Smoke test: what a user of the repo would do.
    reloaded = AutoModelForCausalLM.from_pretrained(args.out)
    tok = AutoTokenizer.from_pretrained(args.out)
    prompt = tok("The Python interpreter", return_tensors="pt")
    out = reloaded.generate(**prompt, max_new_tokens=30, do_sample=False)
    sample = tok.decode(out[0])
    logger.info("sample: %r", sample)
    chat = tok.apply_chat_template([{"role": "user", "content": "What is a list?"}],
                                   tokenize=False, add_generation_prompt=True)
    logger.info("chat template: %r", chat)

    report = {
        "corpus": {"train": {"docs": len(train_docs), "chars": len(train_text), "tokens": len(train_ids)},
                   "heldout": {"docs": len(held_docs), "chars": len(held_text), "tokens": len(held_ids)}},
        "steps": step, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "tokens_seen": step * args.batch_size * args.seq_len,
        "final_train_loss": round(loss_ema, 4),  # EMA (0.9) of the last steps' batch losses
        "heldout_nll": round(held_nll, 4), "heldout_perplexity": round(ppl, 3),
        "heldout_eval": "tokenizer.encode(open('data/demo_heldout.txt').read()), no BOS, "
                        f"non-overlapping {args.seq_len}-token windows, mean NLL over all predicted tokens",
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_minutes": round(train_min, 2), "wall_minutes": round((time.time() - t0) / 60, 2),
        "python": sys.version.split()[0], "torch": torch.__version__, "seed": args.seed,
        "command": " ".join(["python"] + sys.argv), "greedy_sample": sample,
    }
    (args.out / "TRAINING.json").write_text(json.dumps(report, indent=2) + "\n")

    size_mb = sum(f.stat().st_size for f in args.out.iterdir()) / 2**20
    logger.info("saved to %s (%.1f MB); total wall time %.1f min", args.out, size_mb, (time.time() - t0) / 60)


if __name__ == "__main__":
    main()
