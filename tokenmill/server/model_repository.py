"""A Triton model repository: `DIR/<name>/config.pbtxt` and version folders `DIR/<name>/<n>/`
holding a checkpoint. `config.pbtxt` is parsed with protobuf's text format against Triton's
ModelConfig message (server/kserve/protos/model_config.proto), not by hand.

What is read from it: `name` (must match the folder), `backend: "tokenmill"`, `max_batch_size`
(the engine's max_num_seqs when > 0), `version_policy` (latest, specific or all: the highest
version it allows is served), declared inputs and outputs (each must be one tokenmill models
take or give), and `parameters` with engine settings:

    parameters { key: "dtype" value: { string_value: "float32" } }

A model whose config or checkpoint is broken is kept with the reason, so the server can serve
the others and report it as not ready.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

logger = logging.getLogger(__name__)

# Engine settings a config's `parameters` may give, and how to read their string values.
_TRUE = {"true": True, "1": True, "false": False, "0": False}
PARAMETERS: dict[str, Callable[[str], Any]] = {
    "dtype": str, "max_model_len": int, "max_num_seqs": int, "max_num_batched_tokens": int, "block_size": int,
    "kv_cache_memory_bytes": int, "seed": int, "swap_space": float, "linear_backend": str,
    "enable_prefix_caching": lambda v: _TRUE[v.lower()],
}


class RepositoryError(ValueError):
    """Why one model of the repository cannot be served."""


@dataclass
class RepositoryModel:
    name: str
    version: Optional[str] = None
    checkpoint: Optional[str] = None
    engine_settings: dict[str, Any] = field(default_factory=dict)
    error: Optional[str] = None  # set when the model cannot be served


def load_repository(root: str) -> list[RepositoryModel]:
    """Every model folder of the repository, each either loadable or with its error."""
    folder = Path(root)
    if not folder.is_dir():
        raise ValueError(f"model repository {root!r} is not a folder")
    models = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            models.append(read_model(sub))
        except RepositoryError as e:
            logger.warning("model %r in %s cannot be served: %s", sub.name, root, e)
            models.append(RepositoryModel(sub.name, error=str(e)))
    if not models:
        raise ValueError(f"model repository {root!r} holds no model folder")
    return models


def read_model(folder: Path) -> RepositoryModel:
    from google.protobuf import text_format

    from tokenmill.server.kserve.interface import FT_INPUTS, OUTPUTS, TEXT_INPUTS
    from tokenmill.server.kserve.protos import model_config_pb2

    path = folder / "config.pbtxt"
    if not path.is_file():
        raise RepositoryError("no config.pbtxt")
    config = model_config_pb2.ModelConfig()
    try:
        text_format.Parse(path.read_text(encoding="utf-8"), config)
    except (text_format.ParseError, UnicodeDecodeError) as e:
        raise RepositoryError(f"config.pbtxt: {e}") from None
    if config.name and config.name != folder.name:
        raise RepositoryError(f"config.pbtxt names the model {config.name!r}, but its folder is {folder.name!r}")
    if (config.backend or config.platform) != "tokenmill":
        raise RepositoryError(f"config.pbtxt: backend is {config.backend or config.platform!r}; "
                              "this server runs backend \"tokenmill\"")
    inputs = {n for n, *_ in FT_INPUTS + TEXT_INPUTS}
    outputs = {n for n, *_ in OUTPUTS}
    for kind, declared, known in (("input", config.input, inputs), ("output", config.output, outputs)):
        for t in declared:
            if t.name not in known:
                raise RepositoryError(f"config.pbtxt: {kind} {t.name!r} is not one a tokenmill model has "
                                      f"({', '.join(sorted(known))})")
    settings: dict[str, Any] = {}
    if config.max_batch_size > 0:
        settings["max_num_seqs"] = config.max_batch_size
    for key, value in config.parameters.items():
        if key not in PARAMETERS:
            raise RepositoryError(f"config.pbtxt: unknown parameter {key!r} (known: {', '.join(PARAMETERS)})")
        try:
            settings[key] = PARAMETERS[key](value.string_value)
        except (ValueError, KeyError):
            raise RepositoryError(f"config.pbtxt: parameter {key!r} has value {value.string_value!r}, "
                                  f"not a {PARAMETERS[key].__name__ if hasattr(PARAMETERS[key], '__name__') else 'bool'}"
                                  ) from None
    version = _pick_version(folder, config)
    checkpoint = folder / version
    if not (checkpoint / "config.json").is_file():
        raise RepositoryError(f"version {version} has no checkpoint (config.json missing in {checkpoint})")
    return RepositoryModel(folder.name, version, str(checkpoint), settings)


def _pick_version(folder: Path, config: Any) -> str:
    versions = sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())
    if not versions:
        raise RepositoryError("no version folder (1/, 2/, ...)")
    policy = config.version_policy.WhichOneof("policy_choice")
    if policy == "specific":
        wanted = sorted(set(int(v) for v in config.version_policy.specific.versions) & set(versions))
        if not wanted:
            raise RepositoryError(f"version_policy names versions {list(config.version_policy.specific.versions)}, "
                                  f"but the folder has {versions}")
        return str(wanted[-1])
    return str(versions[-1])  # latest (the default) and all: the highest is served
