"""Qwen3-VL and Qwen3-VL-MoE: Qwen2-VL's layout and positions, plus DeepStack.

- Visual tokens, positions, videos, refusals: as Qwen2-VL (``families/qwen2_vl.py``). The rotary
  module interleaves the three mRoPE axes over the frequencies and returns ordinary (B, n, d)
  cos/sin, so a cut slices them like Llama's; attention has ``q_norm``/``k_norm`` on the head
  dimension (``Family.query_rows`` applies ``q_norm``). A video enters as one
  ``<|vision_start|>`` ... ``<|vision_end|>`` run per temporal patch, each after a timestamp text,
  so ``Layout.item`` numbers a video's temporal patches as items of their own. (transformers
  5.23/5.24 expand ``<|video_pad|>`` alone, so the chat template's own boundary tokens stay around
  the whole video, as text; 5.25's processor removes that outer pair. The per-patch runs are the
  same either way. The real video processor is untested here: it needs torchvision.)
- DeepStack: the vision tower also emits features from some of its layers, and the language model
  adds feature ``j`` to the hidden states of the visual placeholders (``visual_pos_masks``) right
  after decoder layer ``j``, inside its own layer loop. A prefill cut after layer ``l`` shortens
  that layer's output before the loop adds feature ``l``, so the mask and the features must
  follow the survivors: a pre-hook on the language model hands it a mask and a feature list owned
  by the session, and ``after_cut`` narrows both to the placeholders still in the sequence (the
  features of dropped tokens are dropped). Survivors then get exactly the additions they get in an
  unpatched model. The MoE variant differs only in its MLP, which the runtime never looks at.
- Vision stage: refused. On top of Qwen2-VL's reasons (packed patches, 2x2 merger), DeepStack
  takes features of every patch from several tower layers, which a window merge would have to
  merge consistently across all of them.
"""

from __future__ import annotations

import inspect
from functools import partial

import torch

from .base import register
from .qwen2_vl import CHAT_TEMPLATE, PLACEHOLDERS, Qwen2VL

_STATE = "qwen3_vl.deepstack"


@register
class Qwen3VL(Qwen2VL):
    name = "qwen3_vl"
    model_classes = (
        "Qwen3VLForConditionalGeneration",
        "Qwen3VLModel",
        "Qwen3VLMoeForConditionalGeneration",
        "Qwen3VLMoeModel",
    )
    vision_refusal = (
        "its tower attends over packed patches, a 2x2 PatchMerger follows and DeepStack feeds features "
        "of several tower layers to the language model; set vision=false"
    )

    # ------------------------------------------------------------------ DeepStack
    def install(self, session) -> None:
        session.state.pop(_STATE, None)
        params = list(inspect.signature(self.lm.forward).parameters)
        hook = partial(self._language_model_pre, session, params)
        session.add_handle(self.lm.register_forward_pre_hook(hook, with_kwargs=True))

    def _language_model_pre(self, session, params, module, args, kwargs):
        kwargs = {**dict(zip(params, args)), **kwargs}
        features = kwargs.get("deepstack_visual_embeds")
        mask = kwargs.get("visual_pos_masks")
        if features is None or mask is None:
            session.state.pop(_STATE, None)
            return None
        # The loop reads the mask and the list on every deepstack layer; these copies are the
        # session's, so narrowing them after a cut leaves the caller's tensors alone.
        live_mask, live_features = mask.clone(), list(features)
        session.state[_STATE] = (mask, list(features), live_mask, live_features)
        kwargs["visual_pos_masks"], kwargs["deepstack_visual_embeds"] = live_mask, live_features
        return (), kwargs

    def next_layer_input(self, ctx, layer: int, output: torch.Tensor) -> torch.Tensor:
        """After a deepstack layer the language model adds that layer's features at the visual
        positions before the next layer runs."""
        record = ctx.session.state.get(_STATE)
        if record is None or layer >= len(record[3]):
            return output
        _, _, live_mask, live_features = record
        following = output.clone()
        following[live_mask] = following[live_mask] + live_features[layer].to(following.dtype)
        return following

    def after_cut(self, ctx, layer: int, index: torch.Tensor | None, old_src: torch.Tensor) -> None:
        record = ctx.session.state.get(_STATE)
        if index is None or record is None or layer >= len(record[1]):
            return  # nothing left the sequence, or no deepstack layer comes after this cut
        mask, features, live_mask, live_features = record
        src = ctx.state.src.to(mask.device)  # (B, n') original index of each remaining entry
        kept = mask.gather(1, src)
        # Features are in row-major order of the original placeholders.
        ordinal = (mask.flatten().long().cumsum(0) - 1).view_as(mask)
        rows = ordinal.gather(1, src)[kept]
        for j in range(layer, len(features)):
            live_features[j] = features[j].index_select(0, rows.to(features[j].device))
        # The loop holds the mask in a local variable: it is narrowed in place.
        live_mask.set_(kept)

    # ------------------------------------------------------------------ measurement
    def flops_shape(self):
        """Decoder only (the tower is not LLaVA's); for MoE the MLP width is that of the experts
        a token runs through (``num_experts_per_tok`` x ``moe_intermediate_size``; the router's
        small product is left out like norms), averaged over the layers when some are dense."""
        import dataclasses

        shape = super().flops_shape()
        text = self.text_config
        if not getattr(text, "num_experts", 0):
            return shape
        sparse = [
            i not in (text.mlp_only_layers or ()) and (i + 1) % text.decoder_sparse_step == 0
            for i in range(self.geometry.num_layers)
        ]
        active = text.num_experts_per_tok * text.moe_intermediate_size
        widths = [active if is_sparse else text.intermediate_size for is_sparse in sparse]
        return dataclasses.replace(shape, intermediate=round(sum(widths) / len(widths)))

    # ------------------------------------------------------------------ tests and demos
    @classmethod
    def tiny_variants(cls):
        return {
            "qwen3_vl": cls.tiny,
            "qwen3_vl_moe": lambda seed=0, attn_implementation="sdpa": cls.tiny(
                seed, attn_implementation, moe=True
            ),
        }

    @classmethod
    def tiny(cls, seed: int = 0, attn_implementation: str = "sdpa", *, moe: bool = False):
        """Qwen3-VL (or its MoE variant, 4 experts, 2 per token): 4 decoder layers (GQA 4/2, head
        dim 16, q/k norms), a 3-layer tower with patch 4, a 2x2 merger and DeepStack features from
        every tower layer, so DeepStack adds to the hidden states after decoder layers 0, 1, 2; a
        32x32 image gives 16 tokens."""
        from transformers import (
            Qwen3VLConfig,
            Qwen3VLForConditionalGeneration,
            Qwen3VLMoeConfig,
            Qwen3VLMoeForConditionalGeneration,
            Qwen3VLProcessor,
        )
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        from ..models.processors import image_only, with_frame_videos
        from ..models.tiny import _WORDS, seeded, tiny_text
        from ..models.tokenizer import word_level_tokenizer

        tokenizer = word_level_tokenizer(
            [*_WORDS, "seconds", "<", ">", *"0123456789"],  # video timestamps
            PLACEHOLDERS,
            {
                "image_token": "<|image_pad|>",
                "video_token": "<|video_pad|>",
                "vision_start_token": "<|vision_start|>",
                "vision_end_token": "<|vision_end|>",
            },
        )
        image_processor = Qwen2VLImageProcessorPil(
            patch_size=4,
            merge_size=2,
            temporal_patch_size=2,
            size={"shortest_edge": 8 * 8, "longest_edge": 64 * 64},
        )
        processor = with_frame_videos(
            image_only(
                Qwen3VLProcessor,
                image_processor=image_processor,
                tokenizer=tokenizer,
                chat_template=CHAT_TEMPLATE,
            )
        )
        ids = {token: tokenizer.convert_tokens_to_ids(token) for token in PLACEHOLDERS}
        text = tiny_text(
            tokenizer,
            head_dim=16,
            rope_parameters={
                "rope_type": "default",
                "mrope_section": [4, 2, 2],
                "mrope_interleaved": True,
                "rope_theta": 10000.0,
            },
        )
        vision = dict(
            depth=3,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            out_hidden_size=64,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0, 1, 2],
            initializer_range=0.08,
        )
        config_cls, model_cls = Qwen3VLConfig, Qwen3VLForConditionalGeneration
        if moe:
            config_cls, model_cls = Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration
            text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
        config = config_cls(
            text_config=text,
            vision_config=vision,
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
        )
        return seeded(model_cls, config, seed, attn_implementation, tokenizer), processor
