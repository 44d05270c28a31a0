"""Loading models by name, folder or hub id, with one-line errors.

Named models: ``tiny`` (random, built from a config: for trying the tools), ``testbed`` (the
shipped, trained easy-vqa LLaVA: the embedded default), ``testbed2`` (LLaVA-1.5 geometry, trained on
small shapes on photos: 576 visual tokens, 16 layers; loaded from the package assets, a one-line
error while no trained weights are shipped there), ``llava-geometry`` (real SmolLM2-135M
language model with a random CLIP-shaped tower at LLaVA-1.5 geometry, built once and cached).
Anything else is a local folder or a Hugging Face hub id, loaded with ``from_pretrained``.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

from ..errors import VistrimError

NAMED = ("testbed", "testbed2", "llava-geometry", "tiny")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise VistrimError(f"unknown dtype {name!r} (choose {', '.join(DTYPES)})")
    return DTYPES[name]


def load_model(spec: str, *, device: str = "cpu", dtype: str = "float32", attn: str = "sdpa"):
    """(model, processor) for a named model, a local folder or a hub id; eval mode, on ``device``."""
    torch_dtype = parse_dtype(dtype)
    if spec == "tiny":
        from .tiny import build_tiny

        model, processor = build_tiny(attn_implementation=attn)
        return model.to(device=device, dtype=torch_dtype), processor
    if spec == "testbed":
        from .testbed import load_testbed

        try:
            return load_testbed(device=device, dtype=torch_dtype, attn_implementation=attn)
        except OSError as error:  # the shipped folder is missing or incomplete (a broken install)
            raise VistrimError(f"cannot load the shipped test-bed model: {_first_line(error)}") from None
    if spec == "testbed2":
        from .testbed2 import load_testbed2

        try:
            return load_testbed2(device=device, dtype=torch_dtype, attn_implementation=attn)
        except OSError as error:
            raise VistrimError(f"cannot load the shipped test-bed 2 model: {_first_line(error)}") from None
    if spec == "llava-geometry":
        from .geometry import load_llava_geometry

        return load_llava_geometry(device=device, dtype=torch_dtype, attn_implementation=attn)
    return _from_pretrained(spec, device, torch_dtype, attn)


def _from_pretrained(spec: str, device: str, dtype: torch.dtype, attn: str):
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

    local = Path(spec).expanduser()
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1
    if not local.exists() and looks_like_path:
        raise VistrimError(f"model folder not found: {spec}")
    source = str(local) if local.exists() else spec
    offline = local.exists() or _cached(spec) or not _hub_reachable()
    try:
        config = AutoConfig.from_pretrained(source, local_files_only=offline)
    except OSError as error:
        if not local.exists() and offline:
            raise VistrimError(
                f"model {spec!r} is not in the local cache and the hub is unreachable"
            ) from None
        where = "folder" if local.exists() else "hub id"
        raise VistrimError(f"cannot load model {spec!r} ({where}): {_first_line(error)}") from None
    except ValueError as error:
        raise VistrimError(f"cannot load model {spec!r}: {_first_line(error)}") from None
    if getattr(config, "image_token_id", None) is None and getattr(config, "image_token_index", None) is None:
        raise VistrimError(
            f"unsupported model {spec!r}: {type(config).__name__} has no image token (not a VLM)"
        )
    try:
        processor = AutoProcessor.from_pretrained(source, local_files_only=offline)
        model = AutoModelForImageTextToText.from_pretrained(
            source, dtype=dtype, attn_implementation=attn, local_files_only=offline
        )
    except (OSError, ValueError) as error:
        raise VistrimError(f"cannot load model {spec!r}: {_first_line(error)}") from None
    return model.to(device).eval(), processor


def _cached(repo_id: str) -> bool:
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(repo_id, local_files_only=True)
        return True
    except (OSError, ValueError):
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


def _first_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
