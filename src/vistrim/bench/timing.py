"""Honest timing inside ``generate``: a clock at every step, peak memory, order statistics."""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from ..errors import VistrimError
from .numbers import spread  # noqa: F401  (re-exported: bench.timing.spread)


def set_threads(threads: int) -> None:
    """torch intra-op threads for a measuring run. On a CPU shared with other jobs, threads waiting
    for a busy core spin instead of working: on 2 cores with one other busy process, two threads
    made a test-bed decode step ten times slower than one (64 ms against 6 ms), so the commands
    default to one thread and every result file records the count."""
    if threads < 1:
        raise VistrimError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


def synchronize(device: torch.device | str) -> None:
    """Wait for queued kernels, so clocks measure work and not launches (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class StepClock(StoppingCriteria):
    """Timestamps each generation step. Stopping criteria run once per step, right after the
    step's token was chosen, so stamp k is when token k+1 exists. Never stops generation."""

    def __init__(self, device: torch.device | str) -> None:
        self.device = device
        self.stamps: list[float] = []

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        synchronize(self.device)
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@dataclass
class Timing:
    """One generate call: time to first token, every decode step's time, end to end (seconds)."""

    prefill: float
    steps: list[float]
    e2e: float
    tokens: int

    def as_dict(self) -> dict:
        return {"prefill": self.prefill, "steps": self.steps, "e2e": self.e2e, "tokens": self.tokens}


def timing_from_stamps(start: float, stamps: Sequence[float], end: float) -> Timing:
    """Prefill = first stamp - start (includes the vision tower and the first token's selection);
    per-token times are the gaps between consecutive stamps."""
    steps = [b - a for a, b in zip(stamps, stamps[1:])]
    return Timing(prefill=stamps[0] - start, steps=steps, e2e=end - start, tokens=len(stamps))


@torch.inference_mode()
def timed_generate(model, inputs, new_tokens: int, **generate_kwargs):
    """Greedy generation of exactly ``new_tokens`` tokens (EOS ignored), timed. Returns
    (Timing, generate output)."""
    device = model.device
    clock = StepClock(device)
    synchronize(device)
    start = time.perf_counter()
    output = model.generate(
        **inputs,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        stopping_criteria=StoppingCriteriaList([clock]),
        **generate_kwargs,
    )
    synchronize(device)
    return timing_from_stamps(start, clock.stamps, time.perf_counter()), output


def reset_peak_memory(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device | str) -> tuple[int, str]:
    """(bytes, kind). CUDA: max allocated since the last reset. CPU: the process's peak RSS, which
    is process-wide and never decreases, so it bounds every configuration run so far."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "cuda_max_memory_allocated"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports kilobytes, macOS bytes.
    return int(peak if sys.platform == "darwin" else peak * 1024), "process_peak_rss"
