"""A checkpoint's tokenizer: loaded with errors that name the file and field at fault, and the token
ids of a chat template applied to a conversation.

transformers' own errors for a broken tokenizer folder are often about something else (a field of
the wrong type can surface as "requires the protobuf library"), so when loading fails the folder's
tokenizer files are checked against what transformers expects and the first problem is named.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

# tokenizer_config.json fields and the JSON types transformers accepts for them.
_SPECIAL = (str, dict, type(None))  # a token, or an AddedToken written as a dict
_CONFIG_FIELDS: dict[str, tuple[tuple[type, ...], str]] = {
    "added_tokens_decoder": ((dict,), "an object of token id -> token"),
    "extra_special_tokens": ((list, dict), "a list of tokens or an object of named tokens"),
    "additional_special_tokens": ((list, type(None)), "a list of tokens"),
    "model_max_length": ((int, float), "a number"),
    "chat_template": ((str, list, type(None)), "a Jinja template, or a list of named templates"),
    "tokenizer_class": ((str, type(None)), "a class name"),
    **{f"{name}_token": (_SPECIAL, "a token string or an AddedToken object")
       for name in ("bos", "eos", "unk", "pad", "sep", "cls", "mask")},
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def load_tokenizer(path: str) -> Any:
    """The checkpoint's tokenizer (transformers' AutoTokenizer). Raises ValueError naming the
    file and field at fault when the folder's tokenizer cannot load."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # transformers raises many types (OSError, TypeError, ImportError, ...)
        problem = diagnose_tokenizer_folder(path)
        cause = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"cannot load the tokenizer in {path!r}: {problem or cause} (pass skip_tokenizer_init=True "
                         "to run on token ids)") from e


def diagnose_tokenizer_folder(path: str) -> Optional[str]:
    """The first problem found in a folder's tokenizer files, or None."""
    folder = Path(path)
    if not folder.is_dir():
        return f"{path!r} is not a folder"
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        return f"no tokenizer file in the folder (one of {', '.join(_TOKENIZER_FILES)})"
    for name in ("tokenizer_config.json", "special_tokens_map.json", "tokenizer.json"):
        file = folder / name
        if not file.is_file():
            continue
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            return f"{name} is not valid JSON ({e})"
        if not isinstance(data, dict):
            return f"{name} must hold a JSON object, found {type(data).__name__}"
        if name == "tokenizer_config.json":
            for key, (types, what) in _CONFIG_FIELDS.items():
                value = data.get(key)
                if key in data and (not isinstance(value, types) or (types is _SPECIAL and isinstance(value, dict)
                                                                      and "content" not in value)):
                    return f"{name}: field {key!r} must be {what}, found {_json_type(value)}"
            decoder = data.get("added_tokens_decoder") or {}
            for token_id, token in decoder.items():
                if not str(token_id).isdigit() or not isinstance(token, dict) or "content" not in token:
                    return (f"{name}: field 'added_tokens_decoder' entry {token_id!r} must map a token id "
                            "to an object with 'content'")
    return None


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def chat_template_ids(tokenizer: Any, conversation: list[dict[str, Any]], add_generation_prompt: bool = True,
                      tools: Optional[list[dict[str, Any]]] = None) -> list[int]:
    """Token ids of the tokenizer's chat template applied to the conversation, with the tools the
    model may call (transformers 5 returns a BatchEncoding by default; older releases a list)."""
    ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tokenize=True,
                                        return_dict=False, tools=tools)
    return list(ids)
