"""``vistrim_llava_hf``: lmms-eval's ``llava_hf`` chat model trimmed: LLaVA-1.5, LLaVA-NeXT and
LLaVA-OneVision checkpoints in the Hugging Face format (llava_hf picks the class from the config's
``model_type``)."""

from __future__ import annotations

import torch
from lmms_eval.models.chat.llava_hf import LlavaHf as _LlavaHf

from .base import Trimming


class LlavaHf(Trimming, _LlavaHf):
    def placement(self, args: dict) -> dict:
        """llava_hf reads ``device_map=""`` (its default) as ``cuda:<local rank>`` under data
        parallelism and passes it to ``from_pretrained`` otherwise, which transformers 5 refuses:
        outside multi-process CUDA runs the map is the device itself."""
        from accelerate import PartialState

        device = args.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        device_map = args.get("device_map") or ""
        if not device_map and not (PartialState().num_processes > 1 and str(device).startswith("cuda")):
            device_map = str(device)
        return {**args, "device": device, "device_map": device_map}
