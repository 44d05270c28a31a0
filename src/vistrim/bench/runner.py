"""Running the benchmark: every configuration interleaved with the unpruned model, then quality.

Timing: a warm-up of every configuration, then for each repeat the unpruned model followed by each
configuration in turn, so drift on a shared machine hits all of them alike. Larger batches (and the
batch each configuration fits in a KV budget) are timed the same way; there only the unpruned model
warms up, since a warm-up costs a whole batched prefill. The unpruned model runs
without vistrim's hooks (the reference a user compares against); ``none`` in ``--methods`` measures
the runtime's own cost. Quality: greedy answers on labelled items (accuracy) and their agreement with
the unpruned model's answers (fidelity), after all timing.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..api import trim
from ..compat import TESTED, output_cache
from ..data.easyvqa import VQAItem
from ..evaluate.fidelity import fidelity_summary
from ..evaluate.harness import accuracy_summary, answer, encode, item_batches, mean, score, visual_counts
from ..runtime.cache import kv_bytes
from .specs import Config
from .timing import peak_memory, reset_peak_memory, timed_generate

Advance = Callable[[str, float], None]


@dataclass(frozen=True)
class BenchOptions:
    new_tokens: int = 64
    repeats: int = 5
    batch: int = 1
    warmup_tokens: int = 4
    labelled: bool = True  # accuracy against labels (the test-bed); fidelity is always measured
    quality_tokens: int = 2
    quality_batch: int = 50


def cache_bytes(cache) -> list[int]:
    """Per-layer bytes of the key and value tensors the cache object holds."""
    return [kv_bytes(layer) for layer in cache.layers]


def timing_items(items: Sequence[VQAItem], count: int, seed: int = 0) -> list[VQAItem]:
    """``count`` items with different images, in a seeded order, so that a timed batch holds
    different prompts and images, never one repeated: one question per image, a question text not
    used yet while there are such (then any), so batches of any size mix prompt lengths too."""
    order = random.Random(seed).sample(list(items), len(items))
    chosen: dict[str, VQAItem] = {}
    for distinct_text in (True, False):
        texts = {item.question for item in chosen.values()}
        for item in order:
            if len(chosen) >= count:
                break
            key = image_key(item)
            if key not in chosen and not (distinct_text and item.question in texts):
                chosen[key] = item
                texts.add(item.question)
    return list(chosen.values())


def image_key(item) -> object:
    """What identifies an item's image: its file (easy-vqa) or its generated scene (test-bed 2)."""
    path = getattr(item, "image_path", None)
    return path if path is not None else id(item.scene)


def workload(model, processor, items: Sequence[VQAItem], batch: int) -> tuple[dict, dict]:
    """Timing inputs (the first ``batch`` items, left-padded) and their geometry."""
    from ..families import family_for

    images, questions = item_batches(items[:batch], batch)[0]
    inputs = encode(processor, images, questions, model)
    info = {
        "batch": batch,
        "prompt_tokens": inputs["attention_mask"].sum(-1).tolist(),
        "padded_length": int(inputs["input_ids"].shape[1]),
        "visual_tokens": visual_counts(model, inputs).tolist(),
        "images_per_sample": inputs["pixel_values"].shape[0] / batch,
        # what the tower runs: one sequence per image, per tile (anyres families) or per frame
        "tower_sequences_per_sample": family_for(model).vision_sequences(dict(inputs)) / batch,
        "questions": questions,
    }
    return inputs, info


@torch.inference_mode()
def unpruned_prefill_bytes(model, inputs) -> list[int]:
    """KV bytes the plain model holds after prefill (one forward, the cache read directly)."""
    return cache_bytes(output_cache(model(**inputs, use_cache=True)))


def timed_run(model, inputs, method, new_tokens: int) -> dict:
    """One timed generate; ``method`` None is the plain model. Returns timings, cache bytes, stats."""
    scope = trim(model, method) if method is not None else contextlib.nullcontext()
    with scope as session:
        timing, output = timed_generate(model, inputs, new_tokens, return_dict_in_generate=True)
    record = {"timing": timing.as_dict(), "kv_bytes_final_read": cache_bytes(output_cache(output))}
    if session is not None:
        record["stats"] = session.stats
    return record


def stats_record(stats) -> dict:
    """What the report needs from one run's statistics, as plain numbers."""
    live_per_layer = [live.sum(-1).double().mean().item() for _, live, _ in stats.prefill_layers]
    vision = getattr(stats, "vision_tokens", None)
    return {
        "summary": stats.summary(),
        "layer_tokens": live_per_layer,
        "vision_tokens": None if vision is None else [float(v) for v in vision],
        "kv_bytes_prefill": list(stats.kv_bytes_prefill),
        "kv_bytes_final": list(stats.kv_bytes_final),
        "kv_bytes_peak": stats.kv_bytes_peak,
    }


def time_all(
    model, inputs, configs: list[Config], options: BenchOptions, advance: Advance, warm_all: bool = True
) -> dict:
    """Warm-up (every configuration, or only the unpruned model), then ``repeats`` interleaved
    rounds. Returns raw records per configuration."""
    methods = [None] + [c.method for c in configs]
    for method in methods if warm_all else methods[:1]:
        timed_run(model, inputs, method, options.warmup_tokens)
        advance("warm-up", 1)
    runs: list[list[dict]] = [[] for _ in methods]
    peaks: list[int] = [0 for _ in methods]
    for repeat in range(options.repeats):
        for index, method in enumerate(methods):
            reset_peak_memory(model.device)
            runs[index].append(measured_run(model, inputs, method, options, keep_stats=repeat == 0))
            peaks[index] = max(peaks[index], peak_memory(model.device)[0])
            advance(f"timing, repeat {repeat + 1}/{options.repeats}", 1)
    return {"runs": runs, "peak_memory": peaks, "peak_memory_kind": peak_memory(model.device)[1]}


def measured_run(model, inputs, method, options: BenchOptions, keep_stats: bool) -> dict:
    """One timed run as a plain record: timings, cache bytes, hook times (and, if asked, the
    statistics the report needs)."""
    record = timed_run(model, inputs, method, options.new_tokens)
    if "stats" in record:
        stats = record.pop("stats")
        record["hook_seconds_prefill"] = stats.hook_seconds_prefill
        record["hook_seconds_decode"] = stats.hook_seconds_decode
        record["runtime_seconds_decode"] = stats.runtime_seconds_decode
        record["kv_bytes_peak"] = stats.kv_bytes_peak
        if keep_stats:
            record["stats"] = stats_record(stats)
    return record


def time_batches(
    model, processor, pool: Sequence[VQAItem], batches: Sequence[int], configs, options, advance: Advance
) -> list[dict]:
    """The timed grid at each of ``batches`` (different prompts and images from ``pool``)."""
    entries = []
    for batch in batches:
        inputs, info = workload(model, processor, pool, batch)
        entries.append(
            {
                "batch": batch,
                "workload": info,
                "timing": time_all(model, inputs, configs, options, advance, warm_all=False),
            }
        )
    return entries


def time_capacity(
    model, processor, pool: Sequence[VQAItem], capacities: Sequence[int], configs, options, advance: Advance
) -> dict:
    """Each configuration at the batch it fits in the KV budget (``capacities[0]``: the unpruned
    model's), interleaved repeat by repeat as elsewhere; a capacity of 0 is not run."""
    methods = [None] + [c.method for c in configs]
    encoded: dict[int, tuple] = {}
    runs: list[list[dict]] = [[] for _ in methods]
    for repeat in range(options.repeats):
        for index, (method, batch) in enumerate(zip(methods, capacities)):
            if batch >= 1:
                if batch not in encoded:
                    encoded[batch] = workload(model, processor, pool, batch)
                inputs = encoded[batch][0]
                if repeat == 0 and index == 0:  # the first run at a new size: warm the plain model
                    timed_run(model, inputs, None, options.warmup_tokens)
                runs[index].append(measured_run(model, inputs, method, options, keep_stats=repeat == 0))
            advance(f"capacity, repeat {repeat + 1}/{options.repeats}", 1)
    workloads = {str(b): info for b, (_, info) in encoded.items()}
    return {"runs": runs, "workloads": workloads}


def quality_all(
    model, processor, items: Sequence[VQAItem], configs: list[Config], options: BenchOptions, advance: Advance
) -> list[dict]:
    """Answers of the unpruned model, then of each configuration: accuracy, fidelity, reached tokens."""
    batches = item_batches(items, options.quality_batch)

    def tick(n: int) -> None:
        advance("answers", n)

    reference = answer(model, processor, batches, None, options.quality_tokens, tick)
    results = [quality_record(items, reference, reference, options)]
    for config in configs:
        answers = answer(model, processor, batches, config.method, options.quality_tokens, tick)
        results.append(quality_record(items, reference, answers, options))
    return results


def quality_record(items, reference, answers, options: BenchOptions) -> dict:
    record = {
        "answers": answers.texts,
        "layer_average_visual": mean(answers.reached),
        "layer_average_visual_post_cut": mean(answers.reached_post_cut),
        "fidelity": fidelity_summary(
            reference.texts, reference.first_logits, answers.texts, answers.first_logits
        ),
    }
    if options.labelled:
        correct = score(items, answers.texts)
        record["correct"] = correct
        record["accuracy"] = accuracy_summary(items, correct)
    return record


def config_meta(config: Config) -> dict:
    """A configuration as plain data: its label, method, budgets and full settings."""
    return {
        "label": config.label,
        "method": config.name,
        "budgets": config.budgets,
        "settings": config.method.settings(),
        "settings_schema": config.method.schema(),
        "describe": config.method.describe(),
    }


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def environment(model, device: str, dtype: str) -> dict:
    """Everything about the machine and software a figure depends on."""
    import dataclasses
    import os

    import transformers

    from .. import __version__
    from ..families import family_for

    return {
        "device": device,
        "dtype": dtype,
        "attention": model.config.text_config._attn_implementation,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "transformers_tested": list(TESTED),
        "vistrim": __version__,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else None,
        "geometry": dataclasses.asdict(family_for(model).geometry),
    }
