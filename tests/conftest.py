"""Shared fixtures: tiny random checkpoints built with transformers, and transformers as the reference."""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A small byte-level BPE tokenizer trained on text every CPython has."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = [topics[k] for k in sorted(topics)][:80]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=500, special_tokens=specials,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=specials[0], eos_token=specials[1],
                                   pad_token=specials[1])
    fast.chat_template = CHAT_TEMPLATE
    out = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(out)
    return out


_counter = itertools.count()


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory, tokenizer_dir) -> Callable[..., tuple[str, Any]]:
    """Build a tiny random model of `arch` with config overrides; save it with the tokenizer."""
    import transformers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cache: dict[str, tuple[str, Any]] = {}

    def build(arch: str = "LlamaForCausalLM", seed: int = 0, **overrides: Any) -> tuple[str, Any]:
        key = repr((arch, seed, sorted(overrides.items())))
        if key in cache:
            return cache[key]
        cfg_cls = getattr(transformers, {"GPT2LMHeadModel": "GPT2Config"}.get(arch, arch.replace("ForCausalLM", "Config")))
        kw = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  # Larger than the usual 0.02 so logits are spread out and greedy ties are unlikely.
                  initializer_range=0.2)
        kw.update(overrides)
        cfg = cfg_cls(architectures=[arch], **kw)
        torch.manual_seed(seed)
        model = getattr(transformers, arch)(cfg).eval()
        path = tmp_path_factory.mktemp(f"ckpt{next(_counter)}")
        model.save_pretrained(path)
        tok.save_pretrained(path)
        model.generation_config.eos_token_id = None  # the reference never stops early
        cache[key] = (str(path), model)
        return cache[key]

    return build


def hf_greedy(model: Any, prompt: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy generation: the reference tokens."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def hf_prompt_logprobs(model: Any, prompt: list[int]) -> torch.Tensor:
    """log p(prompt[i] | prompt[:i]) for i >= 1, from one transformers forward."""
    with torch.inference_mode():
        logits = model(torch.tensor([prompt])).logits[0].float()
    lp = logits.log_softmax(-1)[:-1]
    return lp.gather(-1, torch.tensor(prompt[1:])[:, None])[:, 0]


def random_prompts(lengths: list[int], vocab: int = 512, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, vocab, (n,), generator=g).tolist() for n in lengths]
