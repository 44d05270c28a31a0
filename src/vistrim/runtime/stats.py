"""Per-run statistics: what each layer processed and what each cache holds."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .cache import kv_bytes


@dataclass
class RunStats:
    """Filled in by the runtime during one prefill and the decoding steps that follow it.

    Counts are per sample (tensors of shape (B,)); ``*_mean`` helpers average over samples.
    """

    method: str
    settings: dict
    batch_size: int
    prompt_len: int
    visual_in: torch.Tensor  # (B,) visual tokens in each prompt
    # (src, live, visual) of the prompt entries each decoder layer processed in prefill
    prefill_layers: list = field(default_factory=list)
    kv_bytes_prefill: list[int] = field(default_factory=list)
    kv_bytes_final: list[int] = field(default_factory=list)
    kv_bytes_unpruned_prefill: list[int] = field(default_factory=list)
    kv_bytes_unpruned_final: list[int] = field(default_factory=list)
    cache_visual_prefill: torch.Tensor | None = None  # (L, B) visual entries held after prefill
    cache_visual_final: torch.Tensor | None = None  # (L, B) after the last decoding step
    decode_visual: list[torch.Tensor] = field(default_factory=list)  # per step: (L, B)
    decode_steps: int = 0
    # Wall time spent in method hooks (scoring, selection, compaction), a part of the run's time.
    # On CUDA this is launch time unless the caller synchronizes.
    hook_seconds_prefill: float = 0.0
    hook_seconds_decode: float = 0.0
    # The runtime's own work in decoding steps (positions, masks, cache bookkeeping), apart from
    # the method's hooks: with ``hook_seconds_decode`` everything vistrim adds to a step.
    runtime_seconds_decode: float = 0.0
    # The most KV bytes the cache held at any point of the run (after prefill or any step): what
    # must fit in memory, e.g. for the largest batch a KV budget allows.
    kv_bytes_peak: int = 0
    # Tokens each vision-tower layer processed (CLS included, mean over images) when a method
    # changed them; None means the tower ran untouched.
    vision_tokens: list[float] | None = None
    # Per image, when a vision stage reduced its tokens: (P,) index of the token (among the image's
    # tokens entering the language model) each tower patch went into; None otherwise.
    vision_patch_tokens: list[torch.Tensor] | None = None
    # Per image of a tile family (LLaVA-NeXT, OneVision), when a vision stage merged: (L,) the merged
    # token each placeholder row shows (equal values: one token; -1: newline rows); None otherwise.
    vision_row_tokens: list[torch.Tensor] | None = None
    # Per image, (M,) tokens a method protects from later stages (MustDrop's key set), or None.
    key_tokens: list[torch.Tensor] | None = None
    extra: dict = field(default_factory=dict)  # method-specific numbers (plain types)

    @property
    def num_layers(self) -> int:
        return len(self.prefill_layers)

    def prefill_visual(self) -> torch.Tensor:
        """(L, B) live visual tokens each decoder layer processed during prefill ((0, B) when no
        prefill with visual tokens ran)."""
        if not self.prefill_layers:
            return torch.zeros(0, self.batch_size, dtype=torch.long)
        return torch.stack([(live & visual).sum(-1) for _, live, visual in self.prefill_layers])

    def kept_positions(self, layer: int) -> list[torch.Tensor]:
        """Per sample, the prompt positions of the visual tokens ``layer`` processed in prefill."""
        src, live, visual = self.prefill_layers[layer]
        return [src[b][(live & visual)[b]] for b in range(src.shape[0])]

    def layer_average(self, counting: str = "processed") -> torch.Tensor:
        """(B,) layer-averaged visual tokens: the budget papers compare at. ``processed`` (vistrim's
        count) averages what each layer processes; ``post_cut`` what each layer leaves after its
        own cut (a pruning layer counts its survivors), as MustDrop's and others' released code
        logs it: lower by (N - final) / L, so a paper's "64" may be more than 64 processed."""
        if not self.prefill_layers:
            return torch.zeros(self.batch_size, dtype=torch.double)
        counts = self.prefill_visual().double()
        if counting == "post_cut":
            counts = torch.cat([counts[1:], counts[-1:]])
        return counts.mean(0)

    def layer_average_mean(self, counting: str = "processed") -> float:
        average = self.layer_average(counting)
        return float(average.mean()) if average.numel() else 0.0

    def kv_ratio_prefill(self) -> float:
        return sum(self.kv_bytes_prefill) / max(1, sum(self.kv_bytes_unpruned_prefill))

    def kv_ratio_final(self) -> float:
        return sum(self.kv_bytes_final) / max(1, sum(self.kv_bytes_unpruned_final))

    def record_cache(self, cache, *, after_prefill: bool) -> None:
        """Read KV bytes and visual entries from the cache object itself."""
        layers = cache.layers
        held = [kv_bytes(layer) for layer in layers]
        # Unpruned bytes: the same tensors with every prompt position present.
        unpruned = [
            b // max(1, layer.get_seq_length()) * (layer.prompt_len + layer.generated)
            for b, layer in zip(held, layers)
        ]
        visual = torch.stack([layer.live_visual_count() for layer in layers])
        self.kv_bytes_peak = max(self.kv_bytes_peak, sum(held))
        if after_prefill:
            self.kv_bytes_prefill, self.kv_bytes_unpruned_prefill, self.cache_visual_prefill = (
                held,
                unpruned,
                visual,
            )
        else:
            self.decode_steps += 1
            self.decode_visual.append(visual)
        self.kv_bytes_final, self.kv_bytes_unpruned_final, self.cache_visual_final = held, unpruned, visual

    def add_hook_time(self, phase: str, seconds: float) -> None:
        if phase == "prefill":
            self.hook_seconds_prefill += seconds
        else:
            self.hook_seconds_decode += seconds

    def summary(self) -> dict:
        """Plain numbers (sample means) for printing and JSON."""
        return {
            "method": self.method,
            "settings": self.settings,
            "batch_size": self.batch_size,
            "visual_in": self.visual_in.double().mean().item() if self.visual_in.numel() else 0.0,
            "prefill_visual_per_layer": self.prefill_visual().double().mean(1).tolist(),
            "layer_average_visual": self.layer_average_mean(),
            "layer_average_visual_post_cut": self.layer_average_mean("post_cut"),
            "cache_visual_after_prefill": _layer_means(self.cache_visual_prefill),
            "cache_visual_final": _layer_means(self.cache_visual_final),
            "kv_bytes_after_prefill": sum(self.kv_bytes_prefill),
            "kv_bytes_after_prefill_unpruned": sum(self.kv_bytes_unpruned_prefill),
            "kv_bytes_final": sum(self.kv_bytes_final),
            "kv_bytes_final_unpruned": sum(self.kv_bytes_unpruned_final),
            "decode_steps": self.decode_steps,
            "hook_seconds_prefill": self.hook_seconds_prefill,
            "hook_seconds_decode": self.hook_seconds_decode,
            "runtime_seconds_decode": self.runtime_seconds_decode,
            "kv_bytes_peak": self.kv_bytes_peak,
            "vision_tokens_per_layer": self.vision_tokens,
            **self.extra,
        }


def _layer_means(counts: torch.Tensor | None) -> list[float]:
    return [] if counts is None else counts.double().mean(1).tolist()


def empty_stats(method, batch_size: int = 0, prompt_len: int = 0) -> RunStats:
    """Statistics of a run in which nothing was trimmed (no visual token in the prompt, or no run
    yet): a valid, empty summary."""
    return RunStats(
        method=method.name,
        settings=method.settings(),
        batch_size=batch_size,
        prompt_len=prompt_len,
        visual_in=torch.zeros(batch_size, dtype=torch.long),
    )
