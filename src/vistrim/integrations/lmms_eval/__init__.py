"""lmms-eval plugin: lmms-eval's own model wrappers with their ``generate`` run inside ``vistrim.trim``.

Installed with ``pip install 'vistrim[lmms-eval]'`` and registered through the ``lmms_eval.models``
entry-point group (lmms-eval 0.7 reads manifests from there; ``@register_model`` alone is not seen
by its evaluator). Models, each lmms-eval's chat wrapper of the same name with trimming:

- ``vistrim_llava_hf``: ``llava_hf``, which loads Hugging Face LLaVA-1.5 (``pretrained=testbed`` is
  the test-bed shipped in vistrim), LLaVA-NeXT and LLaVA-OneVision checkpoints (its own
  ``model_type`` map); OneVision's processor builds a video processor, so it needs a torchvision
  that imports with your torch;
- ``vistrim_qwen2_5_vl``: ``qwen2_5_vl`` (Qwen2.5-VL checkpoints); needs that torchvision too
  (``qwen_vl_utils`` imports it) and stops with a one-line error where it does not import.

Not wrapped: lmms-eval's ``llava_onevision``, which runs the original LLaVA-NeXT repository's own
model classes (not on PyPI; vistrim trims transformers' classes): OneVision checkpoints in the
Hugging Face format run through ``vistrim_llava_hf``.

``--model_args pretrained=...,method=st3,keep=0.25,<setting>=...``: every argument that is not the
wrapped model's own is a setting of the method (list values use ``;``: ``layers=2;6;10``); bad ones
stop the run with vistrim's one-line error. ``on_error=raise`` (default) stops the run on the first
failed generation instead of recording an empty answer; ``stats_dir`` (default ``vistrim-stats``)
receives one JSON-lines file per rank with every sample's full statistics.
"""

from __future__ import annotations

MODELS = {
    "vistrim_llava_hf": "vistrim.integrations.lmms_eval.llava_hf.LlavaHf",
    "vistrim_qwen2_5_vl": "vistrim.integrations.lmms_eval.qwen2_5_vl.Qwen2_5_VL",
}


def manifests():
    """The entry point's payload: one chat-model manifest per wrapped lmms-eval model."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=name, chat_class_path=path) for name, path in MODELS.items()]
