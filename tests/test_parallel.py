"""Tensor and pipeline parallelism on CPU: real worker processes talking over gloo.

Every layout must give transformers' greedy tokens (the same ones TP=1 gives) and close prompt
logprobs; converted (pre-sharded) checkpoints must load into the same model; a dead or hung rank
must end in a clear error within a bounded time.
"""
from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.conftest import hf_greedy, hf_prompt_logprobs, random_prompts
from tokenmill import LLM, SamplingParams
from tokenmill.convert import convert_checkpoint
from tokenmill.distributed.executor import DistributedError
from tokenmill.distributed.parallel_state import get_parallel_state

LENGTHS = [1, 7, 17, 40, 90]
NEW_TOKENS = 8
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, prompt_logprobs=0)

CASES = {
    "llama-tp2": ("LlamaForCausalLM", dict(tie_word_embeddings=False), 2, 1),
    "llama-mqa-tp2-kv-replicated": ("LlamaForCausalLM", dict(num_key_value_heads=1), 2, 1),
    "llama-pp2-3-layers": ("LlamaForCausalLM", dict(num_hidden_layers=3), 1, 2),
    "llama-tp2-pp2": ("LlamaForCausalLM", dict(num_hidden_layers=3, tie_word_embeddings=True), 2, 2),
    "bloom-tp2": ("BloomForCausalLM", dict(), 2, 1),
    "bloom-pp2": ("BloomForCausalLM", dict(n_layer=3), 1, 2),
    "gpt2-tp2": ("GPT2LMHeadModel", dict(n_inner=128), 2, 1),
    "opt-project-tp2": ("OPTForCausalLM", dict(ffn_dim=128, word_embed_proj_dim=32), 2, 1),
    "opt-project-pp2": ("OPTForCausalLM", dict(ffn_dim=128, word_embed_proj_dim=32, do_layer_norm_before=False), 1, 2),
    "qwen2-tp2": ("Qwen2ForCausalLM", dict(), 2, 1),
}


def check_against_transformers(llm: LLM, hf, prompts: list[list[int]]) -> None:
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    for p, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, p, NEW_TOKENS), f"prompt of {len(p)} tokens diverged"
        if len(p) > 1:
            got = torch.tensor([d[t].logprob for d, t in zip(out.prompt_logprobs[1:], p[1:])])
            torch.testing.assert_close(got, hf_prompt_logprobs(hf, p), atol=1e-4, rtol=1e-4)
    bm = llm.llm_engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks


@pytest.mark.parametrize("case", list(CASES) + ["llama-tp2-gloo-allreduce"])
def test_parallel_layouts_match_transformers(make_checkpoint, monkeypatch, case):
    if case.endswith("gloo-allreduce"):  # the shared-memory all-reduce off: gloo's own
        monkeypatch.setenv("TOKENMILL_SHM_ALLREDUCE", "0")
    arch, overrides, tp, pp = CASES[case.replace("-gloo-allreduce", "")]
    path, hf = make_checkpoint(arch, **overrides)
    # A small budget so long prompts prefill in chunks across steps, mixed with decodes.
    llm = LLM(path, dtype="float32", tensor_parallel_size=tp, pipeline_parallel_size=pp, max_num_batched_tokens=48,
              distributed_timeout_seconds=60)
    try:
        # Rank 0 really holds only its share of the weights.
        held = sum(p.numel() for p in llm.llm_engine.model_runner.model.parameters())
        assert held < 0.8 * sum(p.numel() for p in hf.parameters())
        # Local tensor-parallel ranks sum through shared memory unless told not to.
        assert (get_parallel_state().shm is not None) == (tp > 1 and not case.endswith("gloo-allreduce"))
        check_against_transformers(llm, hf, random_prompts(LENGTHS, seed=len(case)))
    finally:
        llm.shutdown()


def test_preemption_under_tensor_parallel(make_checkpoint):
    """A pool too small for the batch: preempted sequences are recomputed and still token-exact."""
    path, hf = make_checkpoint("LlamaForCausalLM", num_hidden_layers=3)
    llm = LLM(path, dtype="float32", pipeline_parallel_size=2, num_gpu_blocks_override=12, block_size=4,
              distributed_timeout_seconds=60)
    try:
        assert llm.llm_engine.model_runner.num_blocks == 12
        prompts = random_prompts([9, 14, 11, 6], seed=5)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == [hf_greedy(hf, p, NEW_TOKENS) for p in prompts]
        assert llm.llm_engine.scheduler.num_preemptions > 0
    finally:
        llm.shutdown()


def test_leaving_a_with_block_or_deleting_the_llm_frees_the_process(make_checkpoint):
    """vLLM's habits: `with LLM(...) as llm:` and `del llm` stop the workers, so the same script
    can build the next tensor-parallel LLM; a stopped engine refuses work with a clear error."""
    import gc

    path, hf = make_checkpoint("LlamaForCausalLM", num_hidden_layers=2)
    prompts = random_prompts([5, 12], seed=3)
    with LLM(path, skip_tokenizer_init=True, tensor_parallel_size=2) as llm:
        first = [o.outputs[0].token_ids for o in llm.generate(
            [{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)]
        procs = list(llm.llm_engine.executor.procs)
    assert all(p.poll() is not None for p in procs)
    with pytest.raises(DistributedError, match="shut down"):
        llm.generate([{"prompt_token_ids": prompts[0]}], GREEDY, use_tqdm=False)
    del llm
    second = LLM(path, skip_tokenizer_init=True, tensor_parallel_size=2)
    outs = second.generate([{"prompt_token_ids": p} for p in prompts], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == first == [hf_greedy(hf, p, NEW_TOKENS) for p in prompts]
    procs = list(second.llm_engine.executor.procs)
    del second, outs
    gc.collect()
    assert all(p.poll() is not None for p in procs)


def test_layout_errors_are_refused_before_any_process_starts(make_checkpoint):
    path, _ = make_checkpoint("LlamaForCausalLM", num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(ValueError, match="num_attention_heads \\(4\\) must be divisible by tensor_parallel_size=3"):
        LLM(path, tensor_parallel_size=3)
    with pytest.raises(ValueError, match="pipeline_parallel_size=3 exceeds the model's 2 layers"):
        LLM(path, pipeline_parallel_size=3)
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive integer"):
        LLM(path, tensor_parallel_size=0)


def test_worker_dying_at_start_is_reported_at_once(make_checkpoint, monkeypatch):
    import subprocess
    import sys

    from tokenmill.distributed import executor

    path, _ = make_checkpoint("LlamaForCausalLM")
    real_popen = subprocess.Popen

    def dying_worker(args, **kw):  # a worker that fails on start (an import error, no memory ...)
        return real_popen([sys.executable, "-c", "import sys; sys.stdin.read(); sys.exit(3)"], **kw)

    monkeypatch.setattr(executor.subprocess, "Popen", dying_worker)
    start = time.monotonic()
    with pytest.raises(DistributedError, match="rank 1 exited with code 3 while starting"):
        LLM(path, tensor_parallel_size=2, distributed_timeout_seconds=60)
    assert time.monotonic() - start < 20


def test_failures_after_the_workers_started_leave_nothing_behind(make_checkpoint, tmp_path):
    """Errors raised once the workers run (on rank 0 alone, or on every rank) end in a ValueError
    within seconds, and every worker process is gone."""
    import shutil
    import subprocess

    path, _ = make_checkpoint("LlamaForCausalLM", num_hidden_layers=3)
    no_tokenizer = tmp_path / "no-tok"
    no_tokenizer.mkdir()
    for f in Path(path).iterdir():
        if f.name.startswith(("config", "model", "generation")):
            shutil.copy(f, no_tokenizer / f.name)
    start = time.monotonic()
    with pytest.raises(ValueError, match="cannot load the tokenizer"):  # fails on rank 0 only
        LLM(str(no_tokenizer), tensor_parallel_size=2)
    # Stage 0 holds 2 layers, stage 1 one: the budget fits a block on stage 1 only.
    per_layer_block = 2 * 2 * 16 * 16 * 4  # K and V, 2 KV heads of 16, 16 tokens, float32
    with pytest.raises(ValueError, match="KV cache budget holds no block"):
        LLM(path, dtype="float32", pipeline_parallel_size=2, kv_cache_memory_bytes=int(1.5 * per_layer_block))
    assert time.monotonic() - start < 60
    left = subprocess.run(["pgrep", "-f", "tokenmill.distributed.worker"], capture_output=True, text=True).stdout
    assert not left.strip()
    LLM(path, tensor_parallel_size=2).shutdown()  # and the process can start a new engine


@pytest.mark.parametrize("arch,overrides", [("LlamaForCausalLM", dict(tie_word_embeddings=False)),
                                            ("BloomForCausalLM", dict())])
def test_converted_checkpoint_equals_original(make_checkpoint, tmp_path, arch, overrides):
    path, hf = make_checkpoint(arch, **overrides)
    out = tmp_path / "tp2"
    report = convert_checkpoint(path, str(out), 2, "float32", echo=False)
    assert json.loads((out / "tokenmill_parallel.json").read_text())["tensor_parallel_size"] == 2
    # Each rank's folder holds only its slices: half of every split tensor.
    with safe_open(str(next((out / "rank_1").glob("*.safetensors"))), framework="pt") as f:
        name = next(k for k in f.keys() if k.endswith(("q_proj.weight", "query_key_value.weight")))
        full = dict((n, s) for n, s, r, _ in report.written)[name]
        assert f.get_tensor(name).shape[0] == full[0] // 2
    assert abs(report.rank_bytes[0] - report.rank_bytes[1]) < 0.1 * report.rank_bytes[0]
    llm = LLM(str(out), dtype="float32", tensor_parallel_size=2, distributed_timeout_seconds=60)
    try:
        check_against_transformers(llm, hf, random_prompts([5, 30], seed=11))
    finally:
        llm.shutdown()
    with pytest.raises(ValueError, match="converted for tensor_parallel_size=2"):
        LLM(str(out), tensor_parallel_size=1)


def test_convert_casts_and_loads_with_pipeline_stages(make_checkpoint, tmp_path):
    path, _ = make_checkpoint("LlamaForCausalLM", num_hidden_layers=3)
    out = tmp_path / "fp16"
    convert_checkpoint(path, str(out), 1, "bfloat16", echo=False)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    with safe_open(str(next((out / "rank_0").glob("*.safetensors"))), framework="pt") as f:
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in f.keys())
    prompts = [{"prompt_token_ids": p} for p in random_prompts([12, 25], seed=2)]
    ref = LLM(path, dtype="bfloat16").generate(prompts, GREEDY, use_tqdm=False)
    llm = LLM(str(out), pipeline_parallel_size=2, distributed_timeout_seconds=60)
    try:
        assert llm.llm_engine.model_runner.dtype == torch.bfloat16  # "auto" follows the converted dtype
        got = llm.generate(prompts, GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in ref]
    finally:
        llm.shutdown()


@pytest.mark.parametrize("sig,timeout,what", [(signal.SIGKILL, 60, "rank 1 \\(exit code -9\\) died"),
                                              (signal.SIGSTOP, 3, "did not answer within 3 s")])
def test_dead_or_hung_rank_fails_with_a_clear_error(make_checkpoint, sig, timeout, what):
    path, _ = make_checkpoint("LlamaForCausalLM")
    llm = LLM(path, dtype="float32", tensor_parallel_size=2, distributed_timeout_seconds=timeout)
    worker = llm.llm_engine.executor.procs[0]
    try:
        llm.generate({"prompt_token_ids": [5, 6, 7]}, GREEDY, use_tqdm=False)  # healthy first
        threading.Timer(0.5, os.kill, (worker.pid, sig)).start()
        start = time.monotonic()
        with pytest.raises(DistributedError, match=what):
            llm.generate([{"prompt_token_ids": [5] * 20}] * 4, SamplingParams(max_tokens=100_000 // 4, ignore_eos=True),
                         use_tqdm=False)
        assert time.monotonic() - start < timeout + 15
        with pytest.raises(DistributedError):  # the engine stays failed, it does not hang
            llm.generate({"prompt_token_ids": [5]}, GREEDY, use_tqdm=False)
    finally:
        if worker.poll() is None:
            worker.kill()
        llm.shutdown()


@pytest.mark.parametrize("desc_act", [False, True, "sorted"])
def test_gptq_checkpoint_splits_on_group_boundaries(make_checkpoint, tmp_path, desc_act):
    """Row slices on group boundaries; act-order keeps every group (also when g_idx happens to be
    sorted, as with static groups)."""
    from pydoc_data.topics import topics

    from tokenmill.quantization.config import QuantizeConfig
    from tokenmill.quantization.quantize import quantize_model

    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(topics[k] for k in sorted(topics))[:50_000])
    path, _ = make_checkpoint("LlamaForCausalLM", seed=3, tie_word_embeddings=False)
    q = tmp_path / "q"
    quantize_model(path, str(q), QuantizeConfig(bits=4, group_size=32, desc_act=desc_act is True),
                   calibration=str(calib), num_samples=4, seq_len=64)
    if desc_act == "sorted":
        cfg = json.loads((q / "config.json").read_text())
        cfg["quantization_config"]["desc_act"] = True
        (q / "config.json").write_text(json.dumps(cfg))
    prompts = [{"prompt_token_ids": p} for p in random_prompts([6, 30], seed=4)]
    ref = [o.outputs[0].token_ids for o in LLM(str(q), dtype="float32").generate(prompts, GREEDY, use_tqdm=False)]
    folders = [q]  # cut at load time, and (one case is enough for the converter) pre-sharded
    if desc_act is False:
        folders.append(tmp_path / "q-tp2")
        convert_checkpoint(str(q), str(folders[1]), 2, "auto", echo=False)
    for folder in folders:
        llm = LLM(str(folder), dtype="float32", tensor_parallel_size=2, distributed_timeout_seconds=60)
        try:
            got = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
        finally:
            llm.shutdown()
        assert got == ref, folder


def test_torchrun_rendezvous_serves_from_rank_0(make_checkpoint, tmp_path):
    """Launched the torchrun way (MASTER_ADDR/PORT, WORLD_SIZE, RANK set for each process)."""
    import subprocess
    import sys

    from tokenmill.distributed.executor import _free_port

    path, hf = make_checkpoint("LlamaForCausalLM")
    prompt = random_prompts([9], seed=1)[0]
    script = tmp_path / "run.py"
    script.write_text(
        "import json, sys\nfrom tokenmill import LLM, SamplingParams\n"
        f"llm = LLM({path!r}, dtype='float32', tensor_parallel_size=2)\n"
        f"out = llm.generate({{'prompt_token_ids': {prompt}}}, SamplingParams(temperature=0, max_tokens=6,"
        " ignore_eos=True), use_tqdm=False)\n"
        "print('TOKENS', json.dumps(out[0].outputs[0].token_ids))\n")
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, WORLD_SIZE="2", RANK=str(rank),
                   LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.PIPE, text=True,
                                      cwd=str(Path(__file__).parent.parent)))
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    lines = [line for line in outs[0].splitlines() if line.startswith("TOKENS")]
    assert json.loads(lines[0].split(" ", 1)[1]) == hf_greedy(hf, prompt, 6)
    assert "TOKENS" not in outs[1]  # rank 1 only ran the model


SHM_SCRIPT = """
import sys, torch, torch.distributed as dist
from tokenmill.distributed.parallel_state import init_distributed, get_parallel_state, tp_all_reduce
rank = int(sys.argv[1])
init_distributed(2, 1, rank, sys.argv[2], "gloo", 30)
assert get_parallel_state().shm is not None
g = torch.Generator().manual_seed(rank)
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for shape in ((1, 768), (7, 3), (3000, 1000)):  # the last is over a slot: gloo's path
        x = torch.randn(*shape, generator=g).to(dtype)
        mine = tp_all_reduce(x.clone())
        parts = [torch.empty_like(x) for _ in range(2)]
        dist.all_gather(parts, x)
        assert torch.equal(mine, parts[0] + parts[1]), (dtype, shape)
print("OK", rank)
"""


def test_shared_memory_all_reduce_sums_like_rank_order(tmp_path):
    """Every dtype and size (also one too large for a slot) gives exactly rank 0's + rank 1's."""
    import subprocess
    import sys

    from tokenmill.distributed.executor import _free_port

    script = tmp_path / "shm.py"
    script.write_text(SHM_SCRIPT)
    init = f"tcp://127.0.0.1:{_free_port()}"
    procs = [subprocess.Popen([sys.executable, str(script), str(r), init], stdout=subprocess.PIPE, text=True,
                              cwd=str(Path(__file__).parent.parent)) for r in range(2)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and all("OK" in o for o in outs)
    assert not list(Path("/dev/shm").glob("tokenmill-tp-*"))  # the buffer's name is gone
