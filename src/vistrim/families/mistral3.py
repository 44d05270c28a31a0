"""Mistral 3 (``Mistral3ForConditionalGeneration`` / ``Mistral3Model``: Mistral-Small-3.1/3.2): a
Pixtral tower (2-D rotary positions, any image size), a 2x2 patch merger in the projector and a
Mistral language model.

- Visual tokens: every ``[IMG]`` placeholder (``image_token_index``), one per merged 2x2 patch
  cell; each row of an image ends in ``[IMG_BREAK]`` and the image in ``[IMG_END]``: text tokens,
  never dropped (so an image is several runs of placeholders, one per row).
- Positions and mask: 1-D rotary positions and a causal mask, as the defaults.
- ``vistrim show``: the runs up to ``[IMG_END]`` form the image (``image_index``, through the
  processor's ``image_end_token_id``); one cell per token (a merged 2x2 patch cell), placed by
  the projector's own patch merger run on an index probe.
- Refused at ``trim()``: a sliding window (``sliding_window`` set, the base check), and language
  models that scale queries by position (Ministral 3's ``llama_4_scaling_beta``: the runtime
  rebuilds query rows from ``q_proj`` and rotary embeddings only).
- Vision stage: refused. The tower attends over the patches of every image packed into one
  sequence (a block mask per image) and the projector merges 2x2 patch cells of each image's grid,
  which a window merge breaks.
- FLOPs: decoder only (images of any size and the patch merger are not in bench's formulas).
"""

from __future__ import annotations

import torch

from ..errors import VistrimError
from .base import Family, Layout, TokenCells, register
from .tiles import group_runs, image_span, shuffled_cells

PLACEHOLDERS = ("[IMG]", "[IMG_BREAK]", "[IMG_END]")
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}[IMG]{% else %}{{ item['text'] }}{% endif %}"
    "{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@register
class Mistral3(Family):
    name = "mistral3"
    model_classes = ("Mistral3ForConditionalGeneration", "Mistral3Model")
    tiny_requires = ("torchvision",)  # transformers' PixtralProcessor imports it
    vision_refusal = (
        "its tower attends over the patches of every image packed into one sequence and the "
        "projector merges 2x2 cells of each image's patch grid; set vision=false"
    )

    def check(self) -> None:
        super().check()
        rope = getattr(self.text_config, "rope_parameters", None) or {}
        if rope.get("llama_4_scaling_beta"):
            raise VistrimError(
                f"{self.name}: a language model that scales queries by position (llama_4_scaling_beta, "
                f"{self.text_config.model_type}) is not supported"
            )

    def image_index(self, inputs: dict, layout: Layout, processor=None) -> torch.Tensor:
        """Each row of an image is a run (``[IMG_BREAK]`` between them); an image's last run is
        followed by the processor's ``[IMG_END]``."""
        if int(layout.item.max()) <= 0:
            return layout.item
        end = getattr(processor, "image_end_token_id", None)
        if end is None:
            raise VistrimError(
                f"{self.name}: which rows form an image needs the processor's image_end_token_id"
            )
        after = torch.nn.functional.pad(inputs["input_ids"][:, 1:], (0, 1), value=-1)
        return group_runs(layout.item, layout.visual & (after == int(end)))

    def token_cells(self, inputs: dict, image: int, *, processor=None, image_size=None) -> TokenCells:
        """Image ``image`` is ``pixel_values`` entry ``image`` (its top-left ``image_sizes`` part,
        the rest batch padding): one token per merged patch cell, its order found by running the
        projector's patch merger on an index probe (stopped before its merging layer)."""
        sizes = inputs.get("image_sizes")
        if inputs.get("pixel_values") is None or sizes is None:
            raise VistrimError(f"{self.name}: token cells need pixel_values and image_sizes")
        merger = self.core.multi_modal_projector.patch_merger
        patch, scale = merger.patch_size, merger.spatial_merge_size
        height, width = (int(v) // patch for v in torch.as_tensor(sizes)[image].tolist())
        where, _ = image_span(
            self.image_index(inputs, self.layout(inputs["input_ids"], inputs), processor), image
        )
        if (height // scale) * (width // scale) != len(where):
            raise VistrimError(
                f"{self.name}: image {image} has {len(where)} tokens, not its merged patch grid"
            )

        def merged(probe):
            seen = []

            def stop(_module, args):
                seen.append(args[0])
                raise _Probed

            handle = merger.merging_layer.register_forward_pre_hook(stop)
            try:
                merger(probe[0], torch.tensor([[height * patch, width * patch]]))
            except _Probed:
                pass
            finally:
                handle.remove()
            return seen[0]

        local = shuffled_cells(self.name, merged, height, scale, width)
        cells = [[cell] for cell in local]
        return TokenCells(height // scale, width // scale, cells, ((image, 0, 0),), patch * scale)

    @classmethod
    def tiny(cls, seed: int = 0, attn_implementation: str = "sdpa"):
        """4 Mistral decoder layers (GQA 4/2, no sliding window), a 2-layer Pixtral tower with patch 4
        and a 2x2 merger: an image resized to at most 32 pixels gives up to 4x4 tokens, one
        ``[IMG_BREAK]`` per row."""
        from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PixtralProcessor
        from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

        from ..models.tiny import _WORDS, seeded, tiny_text
        from ..models.tokenizer import word_level_tokenizer

        patch, merge, longest = 4, 2, 32
        tokenizer = word_level_tokenizer(_WORDS, PLACEHOLDERS, {"image_token": "[IMG]"})
        image_processor = PixtralImageProcessorPil(
            size={"longest_edge": longest}, patch_size={"height": patch, "width": patch}
        )
        processor = PixtralProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=patch,
            spatial_merge_size=merge,
            chat_template=CHAT_TEMPLATE,
        )
        text = tiny_text(tokenizer, model_type="mistral", head_dim=16, sliding_window=None)
        vision = dict(
            model_type="pixtral",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            head_dim=16,
            image_size=longest,
            patch_size=patch,
            initializer_range=0.08,
        )
        config = Mistral3Config(
            text_config=text,
            vision_config=vision,
            image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
            spatial_merge_size=merge,
            vision_feature_layer=-1,
        )
        return seeded(
            Mistral3ForConditionalGeneration, config, seed, attn_implementation, tokenizer
        ), processor


class _Probed(Exception):
    """Stops the patch merger of a token-order probe before its merging layer."""
