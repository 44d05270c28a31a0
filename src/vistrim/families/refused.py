"""Model classes vistrim knows and refuses at ``trim()``, with the reason (the model is left untouched).

Refused here are classes whose attention the runtime cannot reproduce after a cut: it rebuilds each
layer's mask with transformers' *causal* mask builder, so a family whose mask lets tokens attend
forward would run after a cut and give wrong output without any error; and classes whose layers
keep no per-token cache that tokens can leave (Qwen3.5's linear attention). Families that are
refused only for some configurations refuse in their own ``check()`` (Mistral 3 with a sliding
window or position-scaled queries, Aya Vision with a Cohere 2 language model).
"""

from __future__ import annotations

from .base import refuse

refuse(
    "its image tokens attend to each other both ways (bidirectional blocks) and its layers mix "
    "sliding-window and global attention; masks rebuilt after a cut would be causal",
    "Gemma3ForConditionalGeneration",
    "Gemma3Model",
)
refuse(
    "its prefix-LM mask lets the image and the prompt attend to each other both ways; masks rebuilt "
    "after a cut would be causal and silently change the output",
    "PaliGemmaForConditionalGeneration",
    "PaliGemmaModel",
)
refuse(
    "its language model interleaves Gated DeltaNet linear-attention layers, which keep a recurrent "
    "state and a convolution window instead of a per-token KV cache that tokens can leave",
    "Qwen3_5ForConditionalGeneration",
    "Qwen3_5Model",
    "Qwen3_5MoeForConditionalGeneration",
    "Qwen3_5MoeModel",
)
