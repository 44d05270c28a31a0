"""Independent reference implementations the runtime is checked against.

They never remove anything: every token stays in the sequence and pruning is expressed as an
attention mask. The runtime removes tokens physically; both must give the same numbers.
"""

from __future__ import annotations

from functools import partial

import torch


def original_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids as ``generate`` computes them for a left-padded batch."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def allowed_to_mask(allowed: torch.Tensor, eager: bool, dtype: torch.dtype) -> torch.Tensor:
    """(B, q, k) bool -> a 4-D mask in the convention of the attention backend."""
    # A row that may see nothing (a padding query) sees itself, so no NaN enters the network.
    allowed = allowed | torch.eye(allowed.shape[1], allowed.shape[2], dtype=torch.bool)[None]
    allowed = allowed[:, None]
    if not eager:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def masked_drop_forward(model, inputs, excluded: list[torch.Tensor], **kwargs):
    """Forward where decoder layer l attends to no key in ``excluded[l]`` (B, T) bool.

    Causality and padding as usual; position ids as the unpatched model would use (arange).
    """
    layers = model.model.language_model.layers
    pad = inputs["attention_mask"].bool()
    length = pad.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    eager = model.config.text_config._attn_implementation == "eager"

    def pre(index, module, args, kw):
        allowed = causal[None] & pad[:, None, :] & ~excluded[index][:, None, :]
        kw["attention_mask"] = allowed_to_mask(allowed, eager, args[0].dtype)
        return args, kw

    handles = [
        layer.register_forward_pre_hook(partial(pre, i), with_kwargs=True) for i, layer in enumerate(layers)
    ]
    try:
        with torch.no_grad():
            return model(**inputs, **kwargs)
    finally:
        for handle in handles:
            handle.remove()


def masked_eviction_logits(model, inputs, generated: torch.Tensor, evicted: list[tuple[int, torch.Tensor]]):
    """Logits of a forward without cache over prompt + generated tokens, where generated token j
    attends to no prompt key that was evicted before step j: ``evicted`` lists (first step it is
    invisible to, (B, T) bool of prompt positions). Returns logits (B, n, V) for the generated tokens.
    """
    prompt_mask = inputs["attention_mask"].bool()
    batch, prompt_len = prompt_mask.shape
    steps = generated.shape[1]
    total = prompt_len + steps
    full_mask = torch.cat([prompt_mask, torch.ones(batch, steps, dtype=torch.bool)], dim=1)
    allowed = torch.ones(total, total, dtype=torch.bool).tril()[None] & full_mask[:, None, :]
    allowed = allowed.clone()
    for first_step, positions in evicted:
        rows = slice(prompt_len + first_step, total)
        allowed[:, rows, :prompt_len] &= ~positions[:, None, :]
    eager = model.config.text_config._attn_implementation == "eager"
    with torch.no_grad():
        out = model(
            input_ids=torch.cat([inputs["input_ids"], generated], dim=1),
            pixel_values=inputs["pixel_values"],
            attention_mask=allowed_to_mask(allowed, eager, torch.float32),
            position_ids=original_positions(full_mask),
            use_cache=False,
        )
    return out.logits[:, prompt_len - 1 : total - 1]


def pdrop_released_rule(model, inputs, stage_starts: list[int], ratios: list[float]):
    """PyramidDrop's released inference rule, written independently of vistrim for one unpadded
    prompt: the decoder layers run one by one on the full sequence; after layer i, when i + 1
    starts stage s, layer i + 1's queries and keys are computed from its input (input_layernorm,
    q_proj/k_proj, rotary at the current positions), the last token's softmax attention over all
    tokens is averaged over heads, the top int(N * ratios[s]) image tokens of the prompt's N are
    kept in order, and positions are renumbered 0..n'-1. Returns (the original positions of the
    image tokens each layer processes, the last token's logits)."""
    import math
    import sys

    lm = model.model.language_model
    captured = {}
    handle = lm.register_forward_pre_hook(
        lambda m, a, k: captured.update(embeds=k["inputs_embeds"]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    hidden = captured["embeds"]
    image = inputs["input_ids"][0] == model.config.image_token_id
    n_image = int(image.sum())
    source = torch.arange(hidden.shape[1])  # original position of each entry
    kept_per_layer = []
    with torch.no_grad():
        for i, layer in enumerate(lm.layers):
            positions = torch.arange(hidden.shape[1])[None]
            kept_per_layer.append(source[image[source]].tolist())
            cos, sin = lm.rotary_emb(hidden, position_ids=positions)
            hidden = layer(
                hidden, attention_mask=None, position_ids=positions, position_embeddings=(cos, sin)
            )
            if i + 1 not in stage_starts:
                continue
            nxt = lm.layers[i + 1]
            attn = nxt.self_attn
            normed = nxt.input_layernorm(hidden)
            dim = attn.head_dim
            q = attn.q_proj(normed).view(1, -1, lm.config.num_attention_heads, dim).transpose(1, 2)
            k = attn.k_proj(normed).view(1, -1, lm.config.num_key_value_heads, dim).transpose(1, 2)
            rope = sys.modules[type(attn).__module__].apply_rotary_pos_emb
            q, k = rope(q, k, cos, sin)
            k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
            weights = torch.softmax(q[:, :, -1:] @ k.transpose(-1, -2) / math.sqrt(dim), dim=-1)
            scores = weights.mean(1)[0, 0]  # (n,) the last token over every token
            is_image = image[source]
            keep = int(n_image * ratios[stage_starts.index(i + 1)])
            top = torch.where(is_image)[0][scores[is_image].topk(keep).indices]
            survivors = torch.sort(torch.cat([torch.where(~is_image)[0], top])).values
            hidden, source = hidden[:, survivors], source[survivors]
        logits = model.lm_head(lm.norm(hidden))[0, -1]
    return kept_per_layer, logits
