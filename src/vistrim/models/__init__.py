"""Loading models by name, folder or hub id, with one-line errors.

Named models: ``tiny`` (random, built from a config: for trying the tools), ``testbed`` (the
shipped, trained easy-vqa LLaVA: the embedded default), ``testbed2`` (LLaVA-1.5 geometry, trained on
small shapes on photos: 576 visual tokens, 16 layers; loaded from the package assets, a one-line
error while no trained weights are shipped there), ``llava-geometry`` (real SmolLM2-135M
language model with a random CLIP-shaped tower at LLaVA-1.5 geometry, built once and cached;
``llava-geometry-672`` the same at 672 px, 2,304 visual tokens per image, for long contexts).
Anything else is a local folder or a Hugging Face hub id, loaded with ``from_pretrained``.

A model folder or hub repo is data, never code: everything is loaded with
``trust_remote_code=False``, and a model that needs its own Python code (``auto_map`` in its
config for an architecture transformers does not know) is refused with one line.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import warnings
from pathlib import Path
from urllib.parse import urlparse

import torch
from safetensors import SafetensorError

from ..compat import LOAD_OPTIONS
from ..errors import VistrimError

NAMED = ("testbed", "testbed2", "llava-geometry", "llava-geometry-672", "tiny")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_FILES = (
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "pytorch_model.bin.index.json",
)
NO_CODE = "vistrim never runs code from a model folder or hub repo"
# What reading a damaged model folder raises; RuntimeError: a truncated pytorch_model.bin, or
# weights whose shapes do not fit the config.
_LOAD_ERRORS = (
    OSError,
    ValueError,
    RuntimeError,
    KeyError,
    SafetensorError,
    pickle.UnpicklingError,
    EOFError,
)


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise VistrimError(f"unknown dtype {name!r} (choose {', '.join(DTYPES)})")
    return DTYPES[name]


def parse_device(name: str | torch.device) -> torch.device:
    """A torch device that exists on this machine (``cpu``, ``cuda``, ``cuda:1``, ``mps``, ...)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about deprecated device types
            device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise VistrimError(f"unknown device {str(name)!r} (e.g. cpu, cuda, cuda:1, mps)") from None
    if device.type == "meta":
        raise VistrimError("device 'meta' holds no data; choose a real device (e.g. cpu, cuda)")
    backend = getattr(torch, device.type, None)
    if device.type != "cpu" and backend is not None and hasattr(backend, "is_available"):
        if not backend.is_available():
            raise VistrimError(f"device {str(name)!r}: {device.type} is not available on this machine")
        count = backend.device_count() if hasattr(backend, "device_count") else None
        if device.index is not None and count is not None and device.index >= count:
            raise VistrimError(f"device {str(name)!r} does not exist ({count} {device.type} device(s))")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, ImportError, NotImplementedError):  # a backend this build lacks
        raise VistrimError(f"device {str(name)!r} is not available in this torch build") from None
    return device


def check_attn(attn: str) -> None:
    """``attn`` is an attention backend transformers has registered (or eager). Hub kernels
    (``org/repo``) are refused: loading one downloads and runs its code."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    registered = sorted(name for name in ALL_ATTENTION_FUNCTIONS.keys() if "|" not in name and name != "sdpa")
    known = ["eager", "sdpa", *registered]
    if attn in known:
        return
    if "/" in attn:
        raise VistrimError(
            f"attention backend {attn!r} is a hub kernel: {NO_CODE} (choose {', '.join(known)})"
        )
    raise VistrimError(f"unknown attention backend {attn!r} (choose {', '.join(known)})")


def load_model(spec: str, *, device: str = "cpu", dtype: str = "float32", attn: str = "sdpa"):
    """(model, processor) for a named model, a local folder or a hub id; eval mode, on ``device``."""
    torch_dtype = parse_dtype(dtype)
    device = parse_device(device)
    check_attn(attn)
    try:
        return _load(spec, device, torch_dtype, attn)
    except ImportError as error:  # e.g. --attn flash_attention_2 without its package
        raise VistrimError(
            f"cannot load model {spec!r} with attention {attn!r}: {_first_line(error)}"
        ) from None


def _load(spec: str, device: torch.device, torch_dtype: torch.dtype, attn: str):
    if spec == "tiny":
        from .tiny import build_tiny

        model, processor = build_tiny(attn_implementation=attn)
        return model.to(device=device, dtype=torch_dtype), processor
    if spec == "testbed":
        from .testbed import load_testbed

        try:
            return load_testbed(device=device, dtype=torch_dtype, attn_implementation=attn)
        except _LOAD_ERRORS as error:  # the shipped folder is missing or incomplete (a broken install)
            raise VistrimError(f"cannot load the shipped test-bed model: {_first_line(error)}") from None
    if spec == "testbed2":
        from .testbed2 import load_testbed2

        try:
            return load_testbed2(device=device, dtype=torch_dtype, attn_implementation=attn)
        except OSError as error:
            raise VistrimError(f"cannot load the shipped test-bed 2 model: {_first_line(error)}") from None
    if spec in ("llava-geometry", "llava-geometry-672"):
        from .geometry import geometry_dir, load_llava_geometry

        try:
            return load_llava_geometry(device=device, dtype=torch_dtype, attn_implementation=attn, name=spec)
        except _LOAD_ERRORS as error:  # a damaged cache folder
            raise VistrimError(
                f"cannot load the cached {spec} model ({_first_line(error)}); "
                f"delete {geometry_dir(spec)} to rebuild it"
            ) from None
    return _from_pretrained(spec, device, torch_dtype, attn)


def _from_pretrained(spec: str, device: torch.device, dtype: torch.dtype, attn: str):
    from transformers import AutoConfig, AutoModelForImageTextToText

    from .processors import load_processor

    local = Path(spec).expanduser()
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1
    if not local.exists() and looks_like_path:
        raise VistrimError(f"model folder not found: {spec}")
    if local.exists():
        _check_folder(local)
    source = str(local) if local.exists() else spec
    offline = local.exists() or _cached(spec) or not _hub_reachable()
    where = "folder" if local.exists() else "hub id"
    options = {"local_files_only": offline, "trust_remote_code": False}
    _refuse_custom_code(spec, source, offline)
    try:
        config = AutoConfig.from_pretrained(source, **options)
    except OSError as error:
        if not local.exists() and offline:
            raise VistrimError(
                f"model {spec!r} is not in the local cache and the hub is unreachable"
            ) from None
        raise VistrimError(f"cannot load model {spec!r} ({where}): {_first_line(error)}") from None
    except ValueError as error:
        raise VistrimError(_value_message(spec, error)) from None
    if getattr(config, "image_token_id", None) is None and getattr(config, "image_token_index", None) is None:
        raise VistrimError(
            f"unsupported model {spec!r}: {type(config).__name__} has no image token (not a VLM)"
        )
    try:
        processor = load_processor(source, local_files_only=offline)
    except VistrimError:
        raise
    except ValueError as error:
        raise VistrimError(_value_message(spec, error, "processor")) from None
    except Exception as error:  # the tokenizers library raises plain Exception for a broken tokenizer.json
        raise VistrimError(f"cannot load the processor of model {spec!r}: {_first_line(error)}") from None
    try:
        model, info = AutoModelForImageTextToText.from_pretrained(
            source, dtype=dtype, attn_implementation=attn, output_loading_info=True, **options, **LOAD_OPTIONS
        )
    except ValueError as error:
        raise VistrimError(_value_message(spec, error, "weights")) from None
    except _LOAD_ERRORS as error:
        raise VistrimError(f"cannot load the weights of model {spec!r}: {_weights_message(error)}") from None
    missing = sorted(info.get("missing_keys") or ())
    if missing:  # transformers would only warn and run them randomly initialised
        raise VistrimError(
            f"model {spec!r} lacks {len(missing)} weight tensor(s) ({missing[0]}); they would run random"
        )
    return model.to(device).eval(), processor


def _check_folder(folder: Path) -> None:
    """Cheap checks of a local model folder before transformers reads it."""
    if not folder.is_dir():
        raise VistrimError(f"model path is not a folder: {folder}")
    if not (folder / "config.json").is_file():
        raise VistrimError(f"model folder {folder} has no config.json")
    if not any(any(folder.glob(pattern)) for pattern in WEIGHT_FILES):
        raise VistrimError(f"model folder {folder} has no weights (model.safetensors or pytorch_model.bin)")


def _refuse_custom_code(spec: str, source: str, offline: bool) -> None:
    """Refuse, before any class is resolved, a model whose architecture exists only as Python
    code in its folder or repo (``auto_map`` naming classes for an unknown ``model_type``)."""
    from transformers import PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        config, _ = PretrainedConfig.get_config_dict(source, local_files_only=offline)
    except (OSError, ValueError, json.JSONDecodeError):
        return  # reported by AutoConfig below, with its own message
    if "auto_map" in config and config.get("model_type") not in CONFIG_MAPPING:
        raise VistrimError(
            f"model {spec!r} needs custom Python code (auto_map in its config.json); {NO_CODE}"
        )


def _value_message(spec: str, error: ValueError, part: str = "config") -> str:
    if "trust_remote_code" in str(error):  # custom code named by a processor or tokenizer file
        return f"model {spec!r} needs custom Python code for its {part}; {NO_CODE}"
    return f"cannot load the {part} of model {spec!r}: {_first_line(error)}"


def _weights_message(error: BaseException) -> str:
    text = str(error)
    if "mismatch" in text:
        return "their tensor shapes do not match config.json"
    if isinstance(error, SafetensorError):
        return f"a .safetensors file is corrupt ({_first_line(error)})"
    if "PytorchStreamReader" in text or isinstance(error, (pickle.UnpicklingError, EOFError)):
        return "a pytorch_model.bin file is corrupt"
    return _first_line(error)


def _cached(repo_id: str) -> bool:
    """Whether the hub cache holds ``repo_id``'s config (reads the cache only)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check, so an offline machine fails in seconds instead of after the hub
    client's retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _first_line(error: BaseException, limit: int = 160) -> str:
    """The first line of an error message; a long line is cut after its first sentence (the rest
    of transformers' messages is advice about the hub)."""
    lines = str(error).strip().splitlines()
    text = lines[0] if lines else type(error).__name__
    if len(text) > limit and ". " in text:
        text = text[: text.index(". ") + 1]
    return text if len(text) <= limit else text[: limit - 3] + "..."
