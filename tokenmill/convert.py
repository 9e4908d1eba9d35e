"""`tokenmill convert`: pre-shard a checkpoint for tensor parallelism, as the article's converter
does for Bloom-7b1 (split for 2 GPUs, cast to fp16).

The output folder holds config.json (its dtype set to the one chosen), the tokenizer, and one
folder per rank, rank_0 ... rank_{N-1}, each a sharded safetensors checkpoint (with sha256 in its
index) of exactly the tensors that rank holds, already cut to its slice and laid out as the engine
keeps them (GPT-2's Conv1D weights transposed). `tokenmill_parallel.json` records the layout; the
engine sees it and has each rank read only its own folder.

The cut is the engine's own: every rank's model is built on the meta device and each checkpoint
tensor goes through the same `shard_tensor` the loader uses, so a converted folder and the
original load into identical weights. Ranks are written one after the other, so memory holds one
rank's share of the model at a time.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from tokenmill.config import ModelConfig, resolve_dtype
from tokenmill.distributed.parallel_state import ParallelState, set_parallel_state
from tokenmill.models.loader import PRESHARDED_FILE, build_model, checkpoint_tensor_names, iterate_weights, locate
from tokenmill.quantization.checkpoint import save_sharded

logger = logging.getLogger(__name__)

_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
# GPTQ keeps these in their own dtypes: packed int32, and float16 scales as the format defines them.
_KEEP_DTYPE = (".qweight", ".qzeros", ".g_idx", ".scales")


@dataclass
class ConvertReport:
    tensor_parallel_size: int
    dtype: str
    # (tensor name, full shape, rank, shape written)
    written: list[tuple[str, tuple[int, ...], int, tuple[int, ...]]] = field(default_factory=list)
    rank_bytes: list[int] = field(default_factory=list)


def convert_checkpoint(model: str, out_dir: str, tensor_parallel_size: int, dtype: str = "auto",
                       max_shard_size: int = 5 << 30, echo: bool = True) -> ConvertReport:
    """Write `model` pre-sharded for `tensor_parallel_size` ranks into `out_dir` (see module doc)."""
    if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {tensor_parallel_size!r}")
    src, out = Path(model), Path(out_dir)
    if out.resolve() == src.resolve():
        raise ValueError("the output folder must differ from the model folder")
    if (src / PRESHARDED_FILE).is_file():
        raise ValueError(f"{model!r} is already pre-sharded; convert the original checkpoint")
    config = ModelConfig(model=model, dtype=dtype, device="cpu", skip_tokenizer_init=True)
    hf = config.hf_config
    # "auto" keeps the checkpoint's dtype.
    ckpt = str(getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None) or "float32").replace("torch.", "")
    target = resolve_dtype(ckpt if dtype == "auto" else dtype, None, torch.device("cpu"))
    report = ConvertReport(tensor_parallel_size, _DTYPE_NAMES[target])
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("rank_*"):  # an earlier conversion for another size
        if stale.is_dir():
            shutil.rmtree(stale)
    names = sorted(checkpoint_tensor_names(model)) or None
    for rank in range(tensor_parallel_size):
        set_parallel_state(ParallelState(tp_size=tensor_parallel_size, tp_rank=rank))
        try:
            rank_model = build_model(config)
        finally:
            set_parallel_state(ParallelState())
        state: dict[str, torch.Tensor] = {}
        with tqdm(total=len(names) if names else None, desc=f"rank {rank}/{tensor_parallel_size}",
                  unit="tensor") as bar:
            for name, tensor in iterate_weights(model):
                bar.update(1)
                found = locate(rank_model, name)
                if found is None:
                    continue  # a tied head or a non-weight buffer: the engine does not load it either
                _, leaf, shard, module = found
                t = tensor.t() if getattr(module, "checkpoint_transposed", False) and leaf == "weight" else tensor
                if hasattr(module, "shard_tensor"):
                    t = module.shard_tensor(leaf, t, shard)
                if t.is_floating_point() and not name.endswith(_KEEP_DTYPE):
                    t = t.to(target)
                state[name] = t.contiguous().clone()
                report.written.append((name, tuple(tensor.shape), rank, tuple(t.shape)))
                if echo:
                    bar.write(f"{name:<60} {str(tuple(tensor.shape)):>16} -> rank {rank} "
                              f"{str(tuple(t.shape)):>16} {str(t.dtype).replace('torch.', '')}")
        rank_dir = out / f"rank_{rank}"
        rank_dir.mkdir()
        save_sharded(state, rank_dir, max_shard_size)
        report.rank_bytes.append(sum(t.numel() * t.element_size() for t in state.values()))
        del state
    cfg = json.loads((src / "config.json").read_text())
    cfg["torch_dtype"] = report.dtype
    cfg.pop("dtype", None)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / PRESHARDED_FILE).write_text(json.dumps({"tensor_parallel_size": tensor_parallel_size,
                                                   "dtype": report.dtype, "source": str(src.resolve())}, indent=2))
    for f in src.iterdir():  # tokenizer, generation config, quantize_config.json
        if f.is_file() and not f.name.endswith((".safetensors", ".bin", ".index.json", ".pt")) \
                and f.name not in ("config.json", PRESHARDED_FILE):
            shutil.copy(f, out / f.name)
    return report
