"""GAMModel's shareable format: a directory with ``config.json`` and ``model.safetensors``.

``save_pretrained`` writes the config (the GAMConfig fields, plus ``model_type: "gam"``) and the
weights in the ``safetensors`` format (the tied LM head is stored once, as the token embedding);
``load_pretrained`` reads such a directory, or downloads the two files of a Hugging Face Hub
repository through ``huggingface_hub``. Every failure says which file is wrong and why.
Checkpoints of the paper's code load through ``GAMModel.from_official`` instead.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gam_ext.modules import GAMConfig

if TYPE_CHECKING:
    from gam_ext.modules import GAMModel

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "save_pretrained", "load_pretrained"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
MODEL_TYPE = "gam"
# Keys of config.json besides the GAMConfig fields: written for the reader, checked on load.
_INFO_KEYS = ("model_type", "architectures", "tie_word_embeddings", "gam_ext_version")
_TIED = "head.weight"  # the same tensor as token_embedding.weight: stored once
# A Hub repository id: "name" or "owner/name" (letters, digits, '-', '_', '.').
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError as exc:
        raise ImportError(
            "save_pretrained/from_pretrained need the `safetensors` package: pip install safetensors"
        ) from exc
    return safetensors.torch


def save_pretrained(model: GAMModel, directory: str | os.PathLike) -> Path:
    """Write ``config.json`` and ``model.safetensors`` for ``model`` into ``directory``.

    The directory is created if needed; existing files of those names are replaced atomically.
    The weights keep their dtype and are stored on the CPU. Returns the directory.
    """
    st = _safetensors()
    state = model.state_dict()
    sharded = [k for k, v in state.items() if type(v).__name__ == "DTensor"]
    if sharded:
        raise ValueError(
            "save_pretrained needs the whole weights, but this model's parameters are sharded "
            f"(DTensor, e.g. {sharded[0]}): gather them first, e.g. with torch.distributed."
            "checkpoint.state_dict.get_model_state_dict(model, options=StateDictOptions("
            "full_state_dict=True, cpu_offload=True)), load them into an unsharded GAMModel and "
            "save that"
        )
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items() if k != _TIED}
    from gam_ext import __version__

    config = {
        "model_type": MODEL_TYPE,
        "architectures": [type(model).__name__],
        **asdict(model.config),
        "tie_word_embeddings": True,
        "gam_ext_version": __version__,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f".{WEIGHTS_NAME}.tmp{os.getpid()}"
    st.save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, directory / WEIGHTS_NAME)
    tmp = directory / f".{CONFIG_NAME}.tmp{os.getpid()}"
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    os.replace(tmp, directory / CONFIG_NAME)
    return directory


def _hub_files(repo_id: str, revision: str | None, cache_dir: str | os.PathLike | None) -> Path:
    """Download config.json and model.safetensors of a Hub repository; the folder holding them."""
    try:
        import huggingface_hub
    except ImportError as exc:
        raise ImportError(
            f"{repo_id!r} is not a local directory, and loading it from the Hugging Face Hub needs "
            "the `huggingface_hub` package: pip install huggingface_hub"
        ) from exc
    paths = []
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        try:
            paths.append(
                huggingface_hub.hf_hub_download(repo_id, name, revision=revision, cache_dir=cache_dir)
            )
        except Exception as exc:
            reason = (str(exc).strip().splitlines() or [""])[0][:300].rstrip(". ")
            raise OSError(
                f"cannot load {repo_id!r} from the Hugging Face Hub ({name}): "
                f"{type(exc).__name__}: {reason}. Without network access (or with "
                "HF_HUB_OFFLINE=1) only repositories already in the Hub cache load; a local "
                "directory written by save_pretrained always does"
            ) from exc
    if Path(paths[0]).parent != Path(paths[1]).parent:
        raise OSError(f"the Hub cache holds the files of {repo_id!r} in two folders: {paths}")
    return Path(paths[0]).parent


def _read_config(path: Path, where: str) -> GAMConfig:
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read {CONFIG_NAME} of {where}: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{CONFIG_NAME} of {where} must hold a JSON object, got {type(raw).__name__}")
    if raw.get("model_type", MODEL_TYPE) != MODEL_TYPE:
        raise ValueError(
            f"{CONFIG_NAME} of {where} describes a {raw['model_type']!r} model, "
            f"not a GAM model (model_type {MODEL_TYPE!r})"
        )
    names = [f.name for f in fields(GAMConfig)]
    unknown = sorted(set(raw) - set(names) - set(_INFO_KEYS))
    missing = [name for name in names if name not in raw]
    if unknown or missing:
        raise ValueError(
            f"{CONFIG_NAME} of {where} does not match GAMConfig: "
            + "; ".join(
                part
                for part in (unknown and f"unknown fields {unknown}", missing and f"missing fields {missing}")
                if part
            )
        )
    try:
        return GAMConfig(**{name: raw[name] for name in names})
    except ValueError as exc:
        raise ValueError(f"{CONFIG_NAME} of {where}: {exc}") from None


def load_pretrained(
    cls: type[GAMModel],
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> GAMModel:
    """Build ``cls`` from a directory written by :func:`save_pretrained`, or a Hub repository id.

    ``source`` is tried as a local directory first; otherwise, when it reads as a Hub id
    (``name`` or ``owner/name``), its two files are downloaded (at ``revision``, into
    ``cache_dir``) through ``huggingface_hub``. The weights must match the config exactly.
    """
    path = Path(os.fspath(source)).expanduser()
    if path.is_dir():
        folder, where = path, str(path)
    elif path.exists():
        raise ValueError(
            f"{str(source)!r} is a file; from_pretrained takes a directory written by "
            "save_pretrained (config.json + model.safetensors) or a Hub id. A checkpoint of the "
            "paper's code loads with GAMModel.from_official"
        )
    elif isinstance(source, str) and _HUB_ID.match(source) and not source.startswith("."):
        folder, where = _hub_files(source, revision, cache_dir), f"Hub repository {source!r}"
    else:
        raise FileNotFoundError(
            f"no directory {str(source)!r} (and it is not a Hub id of the form owner/name)"
        )
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(
                f"{where} is not a saved GAMModel: it has no {name} (GAMModel.save_pretrained "
                f"writes {CONFIG_NAME} and {WEIGHTS_NAME})"
            )
    config = _read_config(folder / CONFIG_NAME, where)
    st = _safetensors()
    try:
        tensors = st.load_file(str(folder / WEIGHTS_NAME), device="cpu")
    except Exception as exc:
        raise ValueError(
            f"cannot read {WEIGHTS_NAME} of {where} (truncated or not safetensors?): "
            f"{type(exc).__name__}: {exc}"
        ) from None
    model = cls(config)
    expected = {k: v for k, v in model.state_dict().items() if k != _TIED}
    problems = [
        f"{k} has shape {tuple(tensors[k].shape)}, the config makes {tuple(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tensors[k].shape != v.shape
    ]
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing:
        problems.append(f"missing {missing[:5]}" + (" ..." if len(missing) > 5 else ""))
    if unexpected:
        problems.append(f"unexpected {unexpected[:5]}" + (" ..." if len(unexpected) > 5 else ""))
    if problems:
        raise ValueError(f"{WEIGHTS_NAME} does not match {CONFIG_NAME} in {where}: " + "; ".join(problems))
    model.load_state_dict({**tensors, _TIED: tensors["token_embedding.weight"]}, strict=True)
    return model
