"""What every trimmed lmms-eval model shares: method settings, a trimmed ``generate``, statistics
in lmms-eval's results and a per-rank side file, and failures that stop the run.

``Trimming`` is mixed in before one of lmms-eval's chat wrappers (``class LlavaHf(Trimming,
llava_hf.LlavaHf)``). The wrapper's own ``generate_until`` loop runs unchanged; while it runs, its
``self.model`` is the model seen through ``_TrimmedGenerate``, whose ``generate`` runs inside
``vistrim.trim`` (hooks on that instance, removed after every call, also on error). Each request's
``doc_to_messages`` is wrapped so that every ``generate`` call is matched to the requests it serves.

Traps of lmms-eval 0.7.3 handled here:

- its wrappers catch every exception from ``generate`` and record an empty answer (``llava_hf``), and
  its command line catches every exception of a run and exits 0: a failure (``on_error=raise``,
  the default) or a bad setting raises ``EvaluationAborted``, a ``SystemExit`` that neither catches,
  so the run stops with ``vistrim: error: ...`` and exit status 1;
- under ``accelerate launch`` with ``device_map=cpu``, ``llava_hf`` leaves every process at rank 0
  of 1 (each would evaluate everything; lmms-eval 0.7.3's evaluator corrects this only after the
  model is built): rank and world size are taken from the accelerator, or from the launcher's
  variables where the accelerator runs single-process (``--multi_gpu`` on a machine without GPUs);
- ``llava_hf``'s default ``device_map=""`` is refused by transformers 5: it is set to the device,
  except under data parallelism on CUDA, where lmms-eval reads "" as ``cuda:<local rank>``;
- lmms-eval keeps only rank 0's throughput numbers: the vistrim numbers are gathered from every
  rank before they are logged.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.metadata
import inspect
import json
import os
import time
from pathlib import Path

import torch

from ... import __version__
from ...api import at_budget, trim
from ...errors import VistrimError
from ...families import family_for
from ...methods import build

OWN_ARGS = ("method", "on_error", "stats_dir")


class EvaluationAborted(SystemExit):
    """Stops an lmms-eval run with one line on stderr and exit status 1 (see the module doc)."""

    def __init__(self, message: str) -> None:
        super().__init__(f"vistrim: error: {message}")


class _GenerationFailed(BaseException):
    """Carries a failed generation out of a wrapper's loop, which catches every ``Exception``."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class _TrimmedGenerate:
    """The model as the wrapped generate loop sees it: ``generate`` is trimmed, everything else is
    the model's own attribute."""

    def __init__(self, model, owner) -> None:
        self._model, self._owner = model, owner

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def generate(self, *args, **kwargs):
        return self._owner._trimmed_generate(self._model, args, kwargs)


def resolve_pretrained(pretrained: str | None) -> str | None:
    """``testbed`` names the model shipped in vistrim; anything else is passed on."""
    if pretrained == "testbed":
        from ...models.testbed import TESTBED_DIR

        return str(TESTBED_DIR)
    return pretrained


def torchvision_problem() -> str | None:
    """Why ``import torchvision`` fails here (None when it works): not installed, or a build made for
    another torch (PyPI's CUDA builds next to a CPU torch raise RuntimeError at import)."""
    try:
        import torchvision  # noqa: F401
    except Exception as error:
        first = (str(error).strip().splitlines() or [""])[0]
        return f"{type(error).__name__}: {first}"
    return None


def method_settings(settings: dict) -> dict:
    """lmms-eval splits ``--model_args`` at commas, so list values come with ``;`` (``layers=2;6``)."""
    return {k: v.replace(";", ",") if isinstance(v, str) else v for k, v in settings.items()}


class Trimming:
    is_simple = False  # chat models: must match the manifest's chat_class_path
    _trimming = False

    def __init__(
        self, method: str = "none", on_error: str = "raise", stats_dir: str = "vistrim-stats", **kwargs
    ) -> None:
        try:
            own, settings = self._split_args(kwargs)
            settings = method_settings(settings)
            fields = {f.name for f in dataclasses.fields(build(method))}
            # budget=: the layer-averaged visual budget; a method's own budget setting takes it (MustDrop),
            # others are configured for it by vistrim.at_budget, per prompt's visual-token count
            self._budget = settings.pop("budget") if "budget" in settings and "budget" not in fields else None
            self._method = build(method, **settings)
            self._budgeted: dict[int, object] = {}
            if on_error not in ("raise", "record"):
                raise VistrimError(f"on_error={on_error!r} must be raise or record")
            self._on_error = on_error
            own["pretrained"] = resolve_pretrained(own.get("pretrained"))
            self._load(own)
            self._rank, self._world_size = self._ranks()
            model = super().model
            if self._budget is not None:  # refuses a method without a budget mode now
                config = getattr(model.config, "image_seq_length", None) or 64
                self._for_visual(model, int(config))
            with trim(model, self._method):  # refuses an unsupported model or setting now
                pass
            self._stats_file = self._open_stats(Path(stats_dir), own["pretrained"])
        except VistrimError as error:
            raise EvaluationAborted(str(error)) from None
        self._pending: list[int] = []
        self._records: dict[int, dict] = {}
        self._requests: list = []

    # ------------------------------------------------------------------ construction
    @classmethod
    def _wrapped_class(cls) -> type:
        mro = cls.__mro__
        return mro[mro.index(Trimming) + 1]

    def _split_args(self, kwargs: dict) -> tuple[dict, dict]:
        """(the wrapped model's own arguments, the method's settings)."""
        parameters = inspect.signature(self._wrapped_class().__init__).parameters
        names = {n for n, p in parameters.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        names.discard("self")
        own = {k: v for k, v in kwargs.items() if k in names}
        return own, {k: v for k, v in kwargs.items() if k not in names}

    def _load(self, own: dict) -> None:
        """The wrapped model's own ``__init__``; a checkpoint it cannot load (a missing folder, a
        processor part that needs a package this environment lacks) is a one-line error, not the
        traceback lmms-eval prints before exiting 0."""
        try:
            super().__init__(**self.placement(own))
        except (ImportError, OSError, RuntimeError, ValueError) as error:
            wrapped = self._wrapped_class()
            raise VistrimError(
                f"lmms-eval's {wrapped.__module__}.{wrapped.__name__} cannot load "
                f"pretrained={own.get('pretrained')}: {type(error).__name__}: {' '.join(str(error).split())}"
            ) from None

    def _ranks(self) -> tuple[int, int]:
        """(rank, world size) from the accelerator when it runs distributed, else from the launcher's
        RANK / WORLD_SIZE (``accelerate launch --multi_gpu`` without GPUs leaves the accelerator
        single-process, and lmms-eval's evaluator starts a gloo group from those variables)."""
        accelerator = self.accelerator
        if accelerator.num_processes > 1:
            return accelerator.process_index, accelerator.num_processes
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

    def placement(self, args: dict) -> dict:
        """The wrapped model's device arguments; by default unchanged."""
        return args

    def _open_stats(self, folder: Path, pretrained) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"vistrim-{self._method.name}-rank{self._rank}-of-{self._world_size}.jsonl"
        header = {
            "kind": "run",
            "model": type(self).__name__,
            "pretrained": pretrained,
            "method": self._method.name,
            "settings": self._method.settings(),
            "budget": self._budget,
            "rank": self._rank,
            "world_size": self._world_size,
            "vistrim": __version__,
            "transformers": importlib.metadata.version("transformers"),
            "lmms_eval": importlib.metadata.version("lmms_eval"),
        }
        path.write_text(json.dumps(header) + "\n")
        return path

    # ------------------------------------------------------------------ requests
    @property
    def model(self):
        model = super().model
        return _TrimmedGenerate(model, self) if self._trimming else model

    def generate_until(self, requests):
        from lmms_eval.api.instance import GenerationResult, TokenCounts

        self._requests, self._records, self._pending = list(requests), {}, []
        self._failed = 0
        tagged = [self._tag(index, request) for index, request in enumerate(requests)]
        self._trimming = True
        try:
            results = super().generate_until(tagged)
        except _GenerationFailed as failed:
            raise EvaluationAborted(failed.message) from None
        finally:
            self._trimming = False
        out = []
        for index, result in enumerate(results):
            record = self._records.get(index)
            if record is not None:  # the effective input: text + layer-averaged visual tokens
                if isinstance(result, str):
                    result = GenerationResult(text=result, token_counts=None)
                counts = result.token_counts or TokenCounts()
                counts.input_tokens = round(record["effective_input_tokens"])
                result.token_counts = counts
            out.append(result)
        self._log_metrics()
        return out

    def loglikelihood(self, requests):
        self._refuse_untrimmed("loglikelihood (multiple-choice scoring)")
        return super().loglikelihood(requests)

    def generate_until_multi_round(self, requests):
        self._refuse_untrimmed("generate_until_multi_round")
        return super().generate_until_multi_round(requests)

    def _refuse_untrimmed(self, what: str) -> None:
        if self._method.name != "none":
            raise EvaluationAborted(f"{what} requests are not trimmed by the vistrim plugin; use method=none")

    def _tag(self, index: int, request):
        """A copy of ``request`` whose ``doc_to_messages`` notes, when the loop calls it, that the
        next ``generate`` serves this request."""
        args = request.args
        if len(args) < 2 or not callable(args[1]):
            raise EvaluationAborted(f"unexpected {request.request_type} request layout (lmms-eval version?)")
        tagged = copy.copy(request)
        tagged.arguments = (args[0], functools.partial(self._messages, index, args[1]), *args[2:])
        return tagged

    def _messages(self, index: int, doc_to_messages, *args, **kwargs):
        self._pending.append(index)
        return doc_to_messages(*args, **kwargs)

    # ------------------------------------------------------------------ generate
    def _trimmed_generate(self, model, args: tuple, kwargs: dict):
        indices, self._pending = self._pending, []
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None or len(indices) != input_ids.shape[0]:
            raise _GenerationFailed(
                f"cannot match a generate call of {0 if input_ids is None else input_ids.shape[0]} rows "
                f"to {len(indices)} requests"
            )
        try:
            method = self._method_for(model, input_ids, kwargs)
            started = time.perf_counter()
            with trim(model, method) as session:
                output = model.generate(*args, **kwargs)
            seconds = time.perf_counter() - started
        except Exception as error:
            if self._on_error == "raise":
                first = (str(error).strip().splitlines() or [""])[0]
                raise _GenerationFailed(
                    f"generation failed on {self._where(indices)}: {type(error).__name__}: {first} "
                    "(on_error=record keeps lmms-eval's empty answer instead)"
                ) from error
            self._failed += len(indices)
            raise
        records = self._record(indices, session.stats, input_ids, kwargs.get("attention_mask"), seconds)
        if self._budget is not None:
            for record in records:
                record["settings"] = method.settings()
        with self._stats_file.open("a") as file:
            file.write("".join(json.dumps(record, default=str) + "\n" for record in records))
        return output

    def _method_for(self, model, input_ids, kwargs: dict):
        """The method as configured, or (``budget=``) configured for the prompt's visual tokens."""
        if self._budget is None:
            return self._method
        counts = set(family_for(model).layout(input_ids, kwargs).visual.sum(-1).tolist())
        if len(counts) != 1:
            raise VistrimError("budget= needs the same number of visual tokens in every prompt of a batch")
        return self._for_visual(model, counts.pop())

    def _for_visual(self, model, n_visual: int):
        if n_visual == 0:
            return self._method
        if n_visual not in self._budgeted:
            layers = family_for(model).geometry.num_layers
            configured = at_budget(self._method, self._budget, n_visual=n_visual, num_layers=layers)
            self._budgeted[n_visual] = configured
        return self._budgeted[n_visual]

    def _where(self, indices: list[int]) -> str:
        requests = [self._requests[i] for i in indices]
        return ", ".join(f"{r.task_name} doc {r.doc_id}" for r in requests)

    def _record(self, indices, stats, input_ids, attention_mask, seconds: float) -> list[dict]:
        batch = len(indices)
        prefill = stats.prefill_visual()
        ran = stats.num_layers > 0
        for row, index in enumerate(indices):
            request = self._requests[index]
            prompt = int(attention_mask[row].sum()) if attention_mask is not None else input_ids.shape[1]
            visual_in = int(stats.visual_in[row]) if stats.visual_in.numel() else 0
            average = float(stats.layer_average()[row]) if ran else float(visual_in)
            record = {
                "kind": "sample",
                "task": request.task_name,
                "doc_id": request.doc_id,
                "padding": bool((request.metadata or {}).get("__padding_only__")),
                "prompt_tokens": prompt,
                "effective_input_tokens": prompt - visual_in + average,
                "visual_in": visual_in,
                "layer_average_visual": average,
                "prefill_visual_per_layer": prefill[:, row].tolist(),
                "cache_visual_after_prefill": _column(stats.cache_visual_prefill, row),
                "cache_visual_final": _column(stats.cache_visual_final, row),
                # the cache is one tensor per layer for the whole batch: its ratios are the batch's
                "kv_ratio_after_prefill": stats.kv_ratio_prefill() if ran else None,
                "kv_ratio_final": stats.kv_ratio_final() if ran else None,
                "kv_bytes_after_prefill": sum(stats.kv_bytes_prefill),
                "kv_bytes_final": sum(stats.kv_bytes_final),
                "decode_steps": stats.decode_steps,
                "hook_seconds": (stats.hook_seconds_prefill + stats.hook_seconds_decode) / batch,
                "generate_seconds": seconds / batch,
                "batch_size": batch,
                "extra": stats.extra,
            }
            self._records[index] = record
        return [self._records[index] for index in indices]

    # ------------------------------------------------------------------ lmms-eval's results
    def _log_metrics(self) -> None:
        """Means over this call's samples of every rank, in lmms-eval's ``throughput`` (each key
        appears there as ``avg_<key>``; padding requests lmms-eval adds to even out ranks excluded)."""
        from lmms_eval.models.model_utils.gen_metrics import log_metrics

        samples = [r for r in self._records.values() if not r["padding"]]
        local = {"samples": samples, "failed": self._failed}
        gathered = [local]
        if self._world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered = [None] * self._world_size
            torch.distributed.all_gather_object(gathered, local)
        samples = [s for part in gathered for s in part["samples"]]
        failed = sum(part["failed"] for part in gathered)
        if not samples and not failed:
            return
        metrics = {"vistrim_samples": len(samples), "vistrim_failed": failed}
        for key, name in (
            ("visual_in", "vistrim_visual_tokens_in"),
            ("layer_average_visual", "vistrim_visual_tokens"),
            ("effective_input_tokens", "vistrim_effective_input_tokens"),
            ("kv_ratio_after_prefill", "vistrim_kv_ratio_prefill"),
            ("kv_ratio_final", "vistrim_kv_ratio_final"),
            ("hook_seconds", "vistrim_hook_ms"),
        ):
            values = [s[key] for s in samples if s[key] is not None]
            if values:
                metrics[name] = sum(values) / len(values) * (1000 if key == "hook_seconds" else 1)
        log_metrics(total_elapsed_time=0.0, total_gen_tokens=0, avg_speed=0.0, additional_metrics=metrics)


def _column(counts, row: int) -> list[int]:
    return [] if counts is None else counts[:, row].tolist()
