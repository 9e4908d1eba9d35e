"""The `tokenmill` command: serve | generate | quantize | convert | eval | roofline | bench."""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Optional

from tokenmill.logs import LOG_FORMATS, configure_logging, resolve as resolve_logging
from tokenmill.quantization.config import SUPPORTED_BITS

logger = logging.getLogger("tokenmill")

DEMO_MODEL = str(Path(__file__).parent / "demo_model")


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Engine flags, named as vLLM names them."""
    p.add_argument("model", nargs="?", default=None, help="checkpoint folder (default: the bundled demo model)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="most sequences in a batch (default: from the roofline, logged at INFO)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="tokens per step (default: from the roofline, logged at INFO)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV cache of shared prefixes (default: on)")
    p.add_argument("--swap-space", type=float, default=0.0, help="GiB for the KV spill tier (default: 0, off)")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="ranks each layer is split over, one process each (gloo on CPU, NCCL on CUDA)")
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1,
                   help="pipeline stages the layers are split into")
    p.add_argument("--linear-backend", default="auto", choices=["auto", "aten", "onednn", "tokenmill"],
                   help="linear-layer kernels: auto times them on this machine and picks per shape and "
                        "batch size (default); the others force one")
    p.add_argument("--distributed-timeout-seconds", type=float, default=120.0,
                   help="seconds a rank waits on a peer before the engine fails (a dead or hung rank)")
    p.add_argument("--scheduling-policy", default="fcfs", choices=["fcfs", "priority"],
                   help="fcfs, or priority: each request's `priority` (lower first) orders the queue and "
                        "preempts lower-priority running requests for KV blocks")
    p.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='speculative decoding, as vLLM: \'{"method": "ngram", "num_speculative_tokens": 4, '
                        '"prompt_lookup_min": 2, "prompt_lookup_max": 5}\', a draft checkpoint '
                        '\'{"model": PATH, "num_speculative_tokens": 4}\', or "method": "auto" '
                        '(propose only while the roofline says it pays)')


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--min-tokens", type=int, default=0)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--sampling-seed", type=int, default=None, help="per-request seed")


def engine_kwargs(args: argparse.Namespace) -> dict:
    return dict(model=args.model or DEMO_MODEL, dtype=args.dtype, max_model_len=args.max_model_len,
                max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                block_size=args.block_size, kv_cache_memory_bytes=args.kv_cache_memory_bytes,
                seed=args.seed, device=args.device, enable_prefix_caching=args.enable_prefix_caching,
                swap_space=args.swap_space, tensor_parallel_size=args.tensor_parallel_size,
                pipeline_parallel_size=args.pipeline_parallel_size,
                distributed_timeout_seconds=args.distributed_timeout_seconds,
                linear_backend=args.linear_backend, speculative_config=args.speculative_config,
                scheduling_policy=args.scheduling_policy)


def _sampling_params(args: argparse.Namespace):
    from tokenmill.sampling_params import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                          repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                          frequency_penalty=args.frequency_penalty, max_tokens=args.max_tokens,
                          min_tokens=args.min_tokens, stop=args.stop, ignore_eos=args.ignore_eos,
                          seed=args.sampling_seed)


def stream(engine, prompt, params, out=sys.stdout) -> str:
    """Generate one completion, writing its text as it is made; returns the whole text."""
    rid = engine.add_request(prompt, params)
    shown, text = 0, ""
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.request_id != rid:
                continue
            text = o.outputs[0].text
            out.write(text[shown:])
            out.flush()
            shown = len(text)
    out.write("\n")
    return text


def cmd_generate(args: argparse.Namespace) -> int:
    from tokenmill.llm import LLM
    from tokenmill.tokenizer import chat_template_ids

    params = _sampling_params(args)
    llm = LLM(**engine_kwargs(args))
    engine = llm.llm_engine
    tok = engine.tokenizer
    if not args.interactive:
        prompt = args.prompt
        if args.chat:
            prompt = {"prompt_token_ids": chat_template_ids(tok, [{"role": "user", "content": prompt}])}
        stream(engine, prompt, params)
        return 0
    print("tokenmill chat on", args.model or "the demo model", "- empty line or Ctrl-D to quit", file=sys.stderr)
    history: list[dict[str, str]] = []
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        history.append({"role": "user", "content": line})
        reply = stream(engine, {"prompt_token_ids": chat_template_ids(tok, history)}, params)
        history.append({"role": "assistant", "content": reply.strip()})
    return 0


def add_quantize_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="float checkpoint folder")
    p.add_argument("out", help="output folder")
    p.add_argument("--bits", type=int, default=4, choices=list(SUPPORTED_BITS))
    p.add_argument("--group-size", type=int, default=128, help="-1: one group per input row")
    p.add_argument("--desc-act", action="store_true", help="act-order: quantize columns by descending H diagonal")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="sym", action="store_true", default=True)
    sym.add_argument("--asym", dest="sym", action="store_false")
    p.add_argument("--static-groups", action="store_true")
    p.add_argument("--damp", type=float, default=0.01, help="damping, a fraction of the mean H diagonal")
    p.add_argument("--calibration", default=None, help="text or JSONL file (default: the demo training text)")
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--dynamic", default=None, help="JSON file of GPTQModel-style per-module rules")
    p.add_argument("--lm-head", action="store_true", help="quantize the output head too")
    p.add_argument("--method", default="gptq", choices=["gptq", "rtn"])
    p.add_argument("--max-shard-size", type=int, default=2 << 30, help="bytes per safetensors shard")
    p.add_argument("--seed", type=int, default=0)


def cmd_quantize(args: argparse.Namespace) -> int:
    import json

    from tokenmill.quantization.config import QuantizeConfig
    from tokenmill.quantization.quantize import format_report, quantize_model

    dynamic = None
    if args.dynamic:
        try:
            dynamic = json.loads(Path(args.dynamic).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"cannot read --dynamic {args.dynamic!r}: {e}") from None
    qcfg = QuantizeConfig(bits=args.bits, group_size=args.group_size, desc_act=args.desc_act, sym=args.sym,
                          damp_percent=args.damp, static_groups=args.static_groups, lm_head=args.lm_head,
                          dynamic=dynamic)
    report = quantize_model(args.model, args.out, qcfg, method=args.method, calibration=args.calibration,
                            num_samples=args.num_samples, seq_len=args.seq_len, seed=args.seed,
                            max_shard_size=args.max_shard_size)
    print(format_report(report))
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from tokenmill.convert import convert_checkpoint

    report = convert_checkpoint(args.model, args.out, args.tensor_parallel_size, args.dtype,
                                max_shard_size=args.max_shard_size)
    for rank, nbytes in enumerate(report.rank_bytes):
        print(f"rank {rank}: {nbytes / 2**20:.1f} MiB in {args.out}/rank_{rank}")
    print(f"{len(report.written)} tensors written for tensor_parallel_size={report.tensor_parallel_size} "
          f"in {report.dtype}; serve with: tokenmill serve {args.out} --tensor-parallel-size "
          f"{report.tensor_parallel_size}")
    return 0


def add_log_args(p: argparse.ArgumentParser, subcommand: bool = False) -> None:
    """--log-level and --log-format, before the command (`tokenmill --log-level DEBUG serve`) or,
    for serve, after it; given after the command, they win."""
    default = argparse.SUPPRESS if subcommand else None
    p.add_argument("--log-level", default=default, type=str.upper,
                   choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"],
                   help="default: $TOKENMILL_LOG_LEVEL, else INFO for serve and WARNING for the other commands")
    p.add_argument("--log-format", default=default, choices=list(LOG_FORMATS),
                   help="text, or json: one JSON object per line, for log shippers "
                        "(default: $TOKENMILL_LOG_FORMAT, else text)")


# Commands that log at INFO unless told otherwise: a server should say what it is doing.
_INFO_COMMANDS = {"serve"}


def cmd_serve(args: argparse.Namespace) -> int:
    from tokenmill.server.app import run_server

    # The model workers of a parallel engine (other processes) log at the server's level, in its format.
    os.environ["TOKENMILL_LOG_LEVEL"], os.environ["TOKENMILL_LOG_FORMAT"] = args.log_level, args.log_format
    return run_server(args, engine_kwargs(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmill", description="LLM inference and serving engine")
    add_log_args(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text, streamed as it is made")
    add_engine_args(g)
    add_sampling_args(g)
    g.add_argument("--prompt", default="The Python interpreter")
    g.add_argument("--chat", action="store_true", help="wrap --prompt in the chat template")
    g.add_argument("--interactive", "-i", action="store_true", help="a chat loop on stdin")
    g.set_defaults(func=cmd_generate)

    from tokenmill.server.app import add_server_args

    srv = sub.add_parser("serve", help="the OpenAI-compatible HTTP server")
    add_engine_args(srv)
    add_server_args(srv)
    add_log_args(srv, subcommand=True)
    srv.set_defaults(func=cmd_serve)

    from tokenmill.router import cli as router_cli

    rt = sub.add_parser("router", help="the fleet router: cache- and load-aware, in front of several `serve` replicas")
    router_cli.add_args(rt)
    rt.set_defaults(func=router_cli.run)

    q = sub.add_parser("quantize", help="GPTQ / RTN quantization into the GPTQ v1 checkpoint format")
    add_quantize_args(q)
    q.set_defaults(func=cmd_quantize)

    c = sub.add_parser("convert", help="pre-shard a checkpoint per tensor-parallel rank, cast to a dtype")
    c.add_argument("model", help="checkpoint folder")
    c.add_argument("out", help="output folder (config, tokenizer, rank_0 ... rank_{N-1})")
    c.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    c.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"],
                   help="dtype of the written weights (auto: the checkpoint's)")
    c.add_argument("--max-shard-size", type=int, default=5 << 30, help="bytes per safetensors file")
    c.set_defaults(func=cmd_convert)

    ev = sub.add_parser("eval", help="evaluations").add_subparsers(dest="eval", required=True)
    b = sub.add_parser("bench", help="benchmarks: tokenmill and its baseline, side by side")
    bench = b.add_subparsers(dest="bench", required=True)
    # Commands whose module provides add_args(parser) and run(args).
    for group, name, module, help_text in (
        (ev, "ppl", "perplexity", "perplexity over non-overlapping windows (the GPTQ paper's measure)"),
        (ev, "lastword", "lastword", "LAMBADA-style last-word accuracy and time: transformers vs tokenmill"),
        (sub, "roofline", "roofline", "roofline of a model on a device: intensity, bounds, memory"),
        (bench, "throughput", "throughput", "offline throughput vs transformers' generate"),
        (bench, "serve", "serve", "a serving benchmark against a running server (OpenAI or KServe), printed as vllm bench serve does"),
        (bench, "latency", "latency", "batch-1 prefill and decode vs transformers, against the bandwidth bound"),
        (bench, "prefix", "prefix", "multi-turn chat: prefix cache off / on / under pressure / spill"),
        (bench, "parallel", "parallel", "tokens/s of tensor/pipeline-parallel layouts against one process"),
        (bench, "structured", "structured", "structured outputs on the demo model: validity, constrained decode tok/s, TTFT"),
        (bench, "fleet", "fleet", "3 replicas behind the router: multi-turn chat per routing policy, and a replica killed mid-run"),
        (bench, "spec", "spec", "speculative decoding: decode tok/s and acceptance per proposer (none, ngram, draft, auto)"),
        (bench, "capacity", "capacity", "admission by expected wait: refusals and admitted TTFT against offered load, with and without the bouncer"),
    ):
        mod = importlib.import_module(f"tokenmill.bench.{module}")
        cmd = group.add_parser(name, help=help_text)
        mod.add_args(cmd)
        cmd.set_defaults(func=mod.run)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        level, fmt = resolve_logging(args.log_level, args.log_format,
                                     "INFO" if args.command in _INFO_COMMANDS else "WARNING")
    except ValueError as e:
        parser.error(str(e))
    configure_logging(level, fmt)
    args.log_level, args.log_format = level, fmt
    try:
        return args.func(args)
    except ValueError as e:
        # Bad input (missing folder, unsupported architecture, bad sampling value...): exit 2.
        print(f"tokenmill: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
