"""LLaVA-1.5 style: ``LlavaForConditionalGeneration`` (CLIP-like tower with a CLS token, two-layer
projector, Llama-shaped language model: Llama, Vicuna, Mistral without sliding window, Qwen2).

Visual tokens: every ``image_token_id`` placeholder (N per image = the tower's patch grid).
Vision stage: supported on one feature layer with the ``default`` strategy (CLS dropped), which is
what LLaVA-1.5 checkpoints use; the CLS row of attention is the importance probe.
"""

from __future__ import annotations

from ..errors import VistrimError
from .base import Family, VisionTower, register


def feature_index(layer, num_layers: int) -> int | None:
    """A ``vision_feature_layer`` as an index into the tower's hidden states (0 = embeddings);
    None when several layers are concatenated."""
    if not isinstance(layer, int):
        return None
    return layer if layer >= 0 else num_layers + 1 + layer


@register
class Llava(Family):
    name = "llava"
    model_classes = ("LlavaForConditionalGeneration", "LlavaModel")

    def tower_model(self):
        tower = self.core.vision_tower
        return getattr(tower, "vision_model", tower)

    def vision_stage_refusal(self) -> str:
        config, tower = self.config, self.tower_model()
        if not (hasattr(getattr(tower, "embeddings", None), "class_embedding") and hasattr(tower, "encoder")):
            return f"it needs a CLIP-like tower with a CLS token, this model's is {type(tower).__name__}"
        if config.vision_feature_select_strategy != "default":
            return "it needs vision_feature_select_strategy='default'"
        if feature_index(config.vision_feature_layer, config.vision_config.num_hidden_layers) is None:
            return "it needs a single vision_feature_layer"
        return ""

    def vision_tower(self) -> VisionTower:
        refusal = self.vision_stage_refusal()
        if refusal:
            raise VistrimError(f"llava: the vision stage is not supported ({refusal})")
        config = self.config
        vision = config.vision_config
        feature_layer = feature_index(config.vision_feature_layer, vision.num_hidden_layers)
        grid = vision.image_size // vision.patch_size
        return VisionTower(
            module=self.core.vision_tower,
            layers=self.tower_model().encoder.layers,
            config=vision,
            grid=(grid, grid),
            prefix=1,
            feature_layer=feature_layer,
            projector=self.core.multi_modal_projector,
            rows=grid * grid,
            encode=self._encode,
        )

    def _encode(self, inputs: dict):
        config = self.config
        output = self.core.get_image_features(
            pixel_values=inputs["pixel_values"],
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        )
        return list(output.pooler_output)

    def flops_shape(self):
        from ..bench.flops import FlopsShape

        geo, vision = self.geometry, self.config.vision_config
        return FlopsShape(
            hidden=geo.hidden_size,
            kv_width=geo.num_kv_heads * geo.head_dim,
            intermediate=geo.intermediate_size,
            vision_hidden=vision.hidden_size,
            vision_intermediate=vision.intermediate_size,
            vision_layers=vision.num_hidden_layers,
            image_size=vision.image_size,
            patch_size=vision.patch_size,
        )

    @classmethod
    def tiny(cls, seed: int = 0, attn_implementation: str = "sdpa"):
        from ..models.tiny import build_tiny

        return build_tiny(seed=seed, attn_implementation=attn_implementation)
