"""lmms-eval plugin: lmms-eval's own model wrappers with their ``generate`` run inside ``vistrim.trim``.

Installed with ``pip install 'vistrim[lmms-eval]'`` and registered through the ``lmms_eval.models``
entry-point group (lmms-eval 0.7 reads manifests from there; ``@register_model`` alone is not seen
by its evaluator). Models, each lmms-eval's chat wrapper of the same name with trimming:

- ``vistrim_llava_hf``: ``llava_hf`` (LLaVA-1.5 style ``LlavaForConditionalGeneration``;
  ``pretrained=testbed`` is the test-bed shipped in vistrim).

Not wrapped yet: ``qwen2_5_vl`` and ``llava_onevision``. Both need a working torchvision (lmms-eval's
Qwen path imports ``qwen_vl_utils``, which imports it; both processors build a video processor,
which needs it), and PyPI only has CUDA builds of torchvision, which fail to import next to a CPU
torch: neither can be run, hence tested, offline on CPU.

``--model_args pretrained=...,method=st3,keep=0.25,<setting>=...``: every argument that is not the
wrapped model's own is a setting of the method (list values use ``;``: ``layers=2;6;10``); bad ones
stop the run with vistrim's one-line error. ``on_error=raise`` (default) stops the run on the first
failed generation instead of recording an empty answer; ``stats_dir`` (default ``vistrim-stats``)
receives one JSON-lines file per rank with every sample's full statistics.
"""

from __future__ import annotations

MODELS = {
    "vistrim_llava_hf": "vistrim.integrations.lmms_eval.llava_hf.LlavaHf",
}


def manifests():
    """The entry point's payload: one chat-model manifest per wrapped lmms-eval model."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id=name, chat_class_path=path) for name, path in MODELS.items()]
