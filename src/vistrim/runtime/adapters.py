"""Thin per-family adapters: where a model keeps its language model, layers, norm and attention.

Everything model-specific the runtime needs is here; the runtime and the methods only talk to an
adapter. Adapters are chosen from ``ADAPTERS`` by the model's class name.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, DynamicLayer

from ..compat import CacheArgument
from ..errors import VistrimError

SUPPORTED_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


@dataclass(frozen=True)
class Geometry:
    """Shapes a method may depend on, read from the model's config (never assumed)."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    image_token_id: int
    vision_layers: int
    vision_hidden: int
    vision_intermediate: int
    image_size: int
    patch_size: int
    vision_feature_layer: int  # index into the tower's hidden states (0 = embeddings)


class LlavaAdapter:
    """``LlavaForConditionalGeneration`` / ``LlavaModel`` with a Llama-style decoder (Llama, Vicuna,
    Mistral without sliding window, Qwen2). Tested with the releases in ``compat.TESTED``."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.core = model.model if hasattr(model, "lm_head") else model
        self.lm = self.core.language_model
        self.layers = self.lm.layers
        self.norm = self.lm.norm
        self.text_config = self.lm.config
        self.vision_tower = self.core.vision_tower
        tower = getattr(self.vision_tower, "vision_model", self.vision_tower)
        self.vision_layers = tower.encoder.layers
        self.cache_arg = CacheArgument.of(self.core.forward)
        self._check()
        attn = self.layers[0].self_attn
        self._rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        self.scaling = float(attn.scaling)
        vision = model.config.vision_config
        self.geometry = Geometry(
            num_layers=len(self.layers),
            num_heads=self.text_config.num_attention_heads,
            num_kv_heads=self.text_config.num_key_value_heads,
            head_dim=attn.head_dim,
            hidden_size=self.text_config.hidden_size,
            intermediate_size=self.text_config.intermediate_size,
            vocab_size=self.text_config.vocab_size,
            image_token_id=int(model.config.image_token_id),
            vision_layers=vision.num_hidden_layers,
            vision_hidden=vision.hidden_size,
            vision_intermediate=vision.intermediate_size,
            image_size=vision.image_size,
            patch_size=vision.patch_size,
            vision_feature_layer=_feature_index(model.config.vision_feature_layer, vision.num_hidden_layers),
        )

    def _check(self) -> None:
        attn_impl = self.text_config._attn_implementation
        if attn_impl not in SUPPORTED_ATTENTION:
            raise VistrimError(
                f"unsupported attention implementation {attn_impl!r} (supported: {SUPPORTED_ATTENTION})"
            )
        layer = self.layers[0]
        if not (
            hasattr(layer, "self_attn")
            and hasattr(layer.self_attn, "q_proj")
            and hasattr(layer, "input_layernorm")
        ):
            raise VistrimError(
                f"unsupported decoder layer {type(layer).__name__}: expected a Llama-style layer"
            )
        if getattr(self.text_config, "sliding_window", None) and getattr(
            self.text_config, "use_sliding_window", True
        ):
            if any(t != "full_attention" for t in getattr(self.text_config, "layer_types", None) or ()):
                raise VistrimError("sliding-window attention layers are not supported")

    def query_rows(
        self, layer: int, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        """Rotated queries (B, H, m, d) of ``layer`` for the hidden-state rows (B, m, D) given, i.e.
        exactly the queries the layer's attention computed for those tokens."""
        decoder = self.layers[layer]
        attn = decoder.self_attn
        q = attn.q_proj(decoder.input_layernorm(hidden))
        q = q.view(*hidden.shape[:-1], -1, attn.head_dim)
        if hasattr(attn, "q_norm"):
            q = attn.q_norm(q)
        q = q.transpose(1, 2)
        return self._rope(q, q, cos, sin)[0]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(input_ids)

    def rotary(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The language model's rotary embeddings (cos, sin) for ``position_ids`` (B, n)."""
        return self.lm.rotary_emb(hidden, position_ids=position_ids)

    def check_cache(self, cache) -> None:
        if not isinstance(cache, DynamicCache) or getattr(cache, "offloading", False):
            raise VistrimError(f"vistrim needs a DynamicCache without offloading, got {type(cache).__name__}")
        if any(type(layer) is not DynamicLayer for layer in cache.layers):
            raise VistrimError("vistrim needs a DynamicCache of full-attention layers")


def _feature_index(layer, num_layers: int) -> int:
    if not isinstance(layer, int):
        return num_layers  # several feature layers: vision-stage methods refuse this model
    return layer if layer >= 0 else num_layers + 1 + layer


ADAPTERS = {
    "LlavaForConditionalGeneration": LlavaAdapter,
    "LlavaModel": LlavaAdapter,
}


def adapter_for(model: nn.Module) -> LlavaAdapter:
    name = type(model).__name__
    if name not in ADAPTERS:
        raise VistrimError(f"unsupported model {name} (supported: {', '.join(ADAPTERS)})")
    return ADAPTERS[name](model)
