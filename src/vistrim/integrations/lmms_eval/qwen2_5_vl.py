"""``vistrim_qwen2_5_vl``: lmms-eval's ``qwen2_5_vl`` chat model (Qwen2.5-VL checkpoints) trimmed.

lmms-eval's Qwen path imports ``qwen_vl_utils``, which imports torchvision, and the Qwen2.5-VL
processor builds a video processor, which needs it: where torchvision does not import (missing, or
a build for another torch), the model stops before anything loads with vistrim's one-line error.
"""

from __future__ import annotations

import torch

from .base import EvaluationAborted, Trimming, torchvision_problem

_problem = torchvision_problem()
if _problem is not None:  # before lmms-eval's module, whose import fails on a broken torchvision
    raise EvaluationAborted(
        "vistrim_qwen2_5_vl needs torchvision (lmms-eval's qwen2_5_vl reads images with qwen-vl-utils, "
        f"which imports it), and it does not import here ({_problem}): install the torchvision build "
        f"made for your torch {torch.__version__} (CPU or its CUDA version)"
    )

from lmms_eval.models.chat.qwen2_5_vl import Qwen2_5_VL as _Qwen2_5_VL  # noqa: E402


class Qwen2_5_VL(Trimming, _Qwen2_5_VL):
    def placement(self, args: dict) -> dict:
        """qwen2_5_vl defaults to ``device=cuda, device_map=auto`` and moves inputs to CUDA under
        ``auto``: without CUDA the default device is the CPU and the map the device itself."""
        device = args.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        placed = {**args, "device": device}
        if not args.get("device_map") and not str(device).startswith("cuda"):
            placed["device_map"] = str(device)
        return placed
