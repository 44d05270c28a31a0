"""Models vistrim refuses: one line at ``trim()`` naming the reason, and the model left untouched.

Each case is a tiny random model built from a config (no hub, no processor). Refused are classes
whose masks the runtime cannot rebuild (the registry in ``families/refused.py``) and settings a
supported family cannot run correctly (its ``check()``).
"""

from __future__ import annotations

import pytest
import torch
from conftest import no_hooks

import vistrim

TEXT = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
)
SIGLIP = dict(
    model_type="siglip_vision_model",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    image_size=32,
    patch_size=4,
)
PIXTRAL = dict(
    model_type="pixtral",
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    head_dim=16,
    image_size=32,
    patch_size=4,
)


def gemma3():
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    text = {**TEXT, "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]}
    config = Gemma3Config(
        text_config=text, vision_config=SIGLIP, mm_tokens_per_image=16, image_token_index=90
    )
    return Gemma3ForConditionalGeneration(config)


def paligemma():
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    config = PaliGemmaConfig(
        text_config={**TEXT, "model_type": "gemma"},
        vision_config={**SIGLIP, "projection_dim": 64},
        projection_dim=64,
        image_token_index=90,
    )
    return PaliGemmaForConditionalGeneration(config)


def mistral3(**text):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    config = Mistral3Config(
        text_config={**TEXT, "model_type": "mistral", **text}, vision_config=PIXTRAL, image_token_index=90
    )
    return Mistral3ForConditionalGeneration(config)


def aya_cohere2():
    from transformers import AyaVisionConfig, AyaVisionForConditionalGeneration

    text = {**TEXT, "model_type": "cohere2", "sliding_window": 8}
    config = AyaVisionConfig(text_config=text, vision_config=SIGLIP, image_token_index=90)
    return AyaVisionForConditionalGeneration(config)


def llava_mistral_window():
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=4,
    )
    text = {**TEXT, "model_type": "mistral", "sliding_window": 16}
    return LlavaForConditionalGeneration(
        LlavaConfig(vision_config=vision, text_config=text, image_token_id=90)
    )


CASES = {
    "gemma3": (gemma3, "bidirectional"),
    "paligemma": (paligemma, "prefix-LM"),
    "mistral3-sliding-window": (lambda: mistral3(sliding_window=16), "sliding-window"),
    "mistral3-ministral3": (
        lambda: mistral3(model_type="ministral3", sliding_window=None),
        "scales queries by position",
    ),
    "aya_vision-cohere2": (aya_cohere2, "Cohere 2"),
    "llava-mistral-sliding-window": (llava_mistral_window, "sliding-window"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_refused_in_one_line_and_left_untouched(case):
    build, reason = CASES[case]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build().eval()
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    for method in ("fastv", "mustdrop"):
        with pytest.raises(vistrim.VistrimError, match=reason) as error:
            with vistrim.trim(model, method):
                pass
        assert "\n" not in str(error.value)
        assert no_hooks(model)
    assert all(torch.equal(state[name], tensor) for name, tensor in model.state_dict().items())
