"""``vistrim eval`` as Python: accuracy on labelled questions (easy-vqa, or test-bed 2's shapes on
photos), or fidelity to the unpruned model on any image x
prompt pairs, per method x budget. The CLI only parses.

>>> from vistrim.evaluate.suite import EvalPlan, evaluate_accuracy, write_outputs
>>> plan = EvalPlan(model="testbed", samples=100)
>>> document = evaluate_accuracy(model, processor, "fastv,st3", plan)
>>> write_outputs(document, "results/my-eval")
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..data.labelled import DATA
from ..errors import VistrimError

DEFAULT_BUDGETS = "0.33,0.22,0.11"
ABLATIONS = ("none", "blank", "background")


@dataclass(frozen=True)
class EvalPlan:
    model: str = "testbed"  # the model's name as given (recorded; decides the default instruction)
    device: str = "cpu"
    dtype: str = "float32"
    budgets: str | None = None  # None: 0.33,0.22,0.11 plus st3's and mustdrop's own defaults
    samples: int | None = None  # items (or image x prompt pairs); None: 500 items, every pair
    batch_size: int = 50
    max_new_tokens: int = 2  # answer length (the CLI's default is 16 for fidelity)
    instruction: str | None = None  # None: the model's default (see evaluate.harness)
    pairs: list = field(default_factory=list)  # fidelity: (image file, prompt) per item, recorded
    data: str | None = None  # labelled questions: "easy-vqa" or "shapes"; None: the model's default
    ablate: str = "none"  # "blank": every image uniform gray; "background" (shapes): the bare photo

    def check(self) -> EvalPlan:
        if self.batch_size < 1:
            raise VistrimError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.samples is not None and self.samples < 1:
            raise VistrimError(f"--limit must be >= 1, got {self.samples}")
        if self.max_new_tokens < 1:
            raise VistrimError("--max-new-tokens must be >= 1")
        if self.data not in (None, *DATA):
            raise VistrimError(f"--data must be one of {', '.join(DATA)}, got {self.data!r}")
        if self.ablate not in ABLATIONS:
            raise VistrimError(f"--ablate must be one of {', '.join(ABLATIONS)}, got {self.ablate!r}")
        if self.ablate == "background" and self.data_name != "shapes":
            raise VistrimError("--ablate background needs --data shapes (easy-vqa images have no photo)")
        return self

    @property
    def data_name(self) -> str:
        from ..data.labelled import default_data

        return self.data or default_data(self.model)


def specs_and_budgets(methods, plan: EvalPlan):
    from ..bench.specs import default_method_specs, parse_budgets, parse_method_specs

    if methods is None:
        methods = default_method_specs(include_none=True, eager_mustdrop=False)
    specs = parse_method_specs(methods) if isinstance(methods, str) else list(methods)
    return specs, parse_budgets(plan.budgets or DEFAULT_BUDGETS)


def fidelity_batches(images, prompts_file, prompt, plan: EvalPlan) -> tuple[list, EvalPlan]:
    """Image x prompt batches from files and folders, and the plan recording the pairs."""
    from ..io import load_image
    from .fidelity import collect_images, pair_batches, pair_up, read_prompts

    files = collect_images(images)
    prompts = read_prompts(prompts_file, prompt)
    pictures = [load_image(f) for f in files]
    pairs = pair_up(pictures, prompts, plan.samples)
    named = [(str(f), p) for f in files for p in prompts][: len(pairs)]
    return pair_batches(pairs, plan.batch_size), replace(plan, pairs=named)


def grid(model, processor, first_batch, specs, budgets, plan: EvalPlan):
    """The method x budget configurations for this model's visual-token count and depth."""
    from ..bench.specs import build_configs
    from ..families import family_for
    from .harness import encode, visual_counts

    images, prompts = first_batch
    n_visual = int(visual_counts(model, encode(processor, images[:1], prompts[:1], model))[0])
    return build_configs(
        specs, budgets, n_visual, family_for(model).geometry.num_layers, plan.budgets is None
    )


@contextmanager
def progress(total: int, label: str):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with bar:
        task = bar.add_task(label, total=total)

        def advance(n: int, what: str | None = None) -> None:
            bar.update(task, advance=n, description=what or label)

        yield advance


def run_grid(model, processor, batches, configs, max_new_tokens: int, n_items: int):
    """Answers of the plain model, then of every configuration, under one progress bar."""
    from .harness import answer

    results = []
    with progress(n_items * (len(configs) + 1), "eval") as advance:
        for config in [None, *configs]:
            name = "unpruned" if config is None else f"{config.label} @ {config.budget_label}"
            method = None if config is None else config.method
            tick = lambda n, name=name: advance(n, f"eval: {name}")  # noqa: E731
            results.append(answer(model, processor, batches, method, max_new_tokens, tick))
    return results


def meta(config) -> dict:
    from ..bench.runner import config_meta

    if config is None:
        return {"label": "unpruned", "method": None, "budgets": [], "settings": {}}
    return config_meta(config)


def image_source(ablate: str):
    """Item -> image: the item's own, a uniform gray one of the same size, or its bare photo."""
    from PIL import Image

    from ..data.easyvqa import BLANK_COLOR
    from ..data.shapes import render
    from .harness import item_image

    if ablate == "blank":
        return lambda item: Image.new("RGB", item_image(item).size, BLANK_COLOR)
    if ablate == "background":
        return lambda item: render(item.scene, "background")
    return item_image


def evaluate_accuracy(model, processor, methods, plan: EvalPlan) -> dict:
    """Accuracy on a fixed labelled test subset (``plan.data``) per method x budget (``methods``: a
    ``--methods`` string, a list of ``MethodSpec``, or None for every method)."""
    from ..data.labelled import labelled_test_items
    from .harness import config_summary, default_instruction, item_batches

    specs, budgets = specs_and_budgets(methods, plan.check())
    plan = replace(plan, data=plan.data_name)
    items, data = labelled_test_items(plan.data, plan.samples or 500)
    if plan.instruction is None:
        plan = replace(plan, instruction=default_instruction(plan.model))
    batches = item_batches(items, plan.batch_size, plan.instruction, image_source(plan.ablate))
    configs = grid(model, processor, batches[0], specs, budgets, plan)
    answers = run_grid(model, processor, batches, configs, plan.max_new_tokens, len(items))
    reference = config_summary(items, answers[0].texts, answers[0].reached, 0.0)
    rows = []
    for config, result in zip([None, *configs], answers):
        summary = config_summary(items, result.texts, result.reached, reference["accuracy"])
        rows.append({**meta(config), **summary, **post_cut(result), "batch_stats": result.batches})
    if plan.ablate != "none":
        data += f", images replaced ({plan.ablate})"
    settings = eval_settings(model, plan, configs, len(items), data)
    return {"mode": "accuracy", "settings": settings, "rows": rows}


def evaluate_fidelity(model, processor, batches, methods, plan: EvalPlan) -> dict:
    """Agreement with the unpruned model on ``batches`` of (images, prompts) per method x budget."""
    from .fidelity import fidelity_summary
    from .harness import mean

    specs, budgets = specs_and_budgets(methods, plan.check())
    configs = grid(model, processor, batches[0], specs, budgets, plan)
    n_items = sum(len(prompts) for _, prompts in batches)
    answers = run_grid(model, processor, batches, configs, plan.max_new_tokens, n_items)
    ref = answers[0]
    rows = []
    for config, result in zip([None, *configs], answers):
        summary = fidelity_summary(ref.texts, ref.first_logits, result.texts, result.first_logits)
        reached = {"layer_average_visual": mean(result.reached), "reached_per_sample": result.reached}
        rows.append(
            {
                **meta(config),
                **summary,
                **reached,
                **post_cut(result),
                "answers": result.texts,
                "batch_stats": result.batches,
            }
        )
    settings = eval_settings(model, plan, configs, n_items, "image x prompt pairs")
    settings["pairs"] = plan.pairs
    return {"mode": "fidelity", "settings": settings, "rows": rows}


def post_cut(result) -> dict:
    """The layer average counted as released code logs it (a pruning layer counts its survivors)."""
    from .harness import mean

    return {"layer_average_visual_post_cut": mean(result.reached_post_cut)}


def eval_settings(model, plan: EvalPlan, configs, n_items: int, data: str) -> dict:
    from ..bench.runner import environment

    return {
        "model": plan.model,
        **environment(model, plan.device, plan.dtype),
        "data": data,
        "samples": n_items,
        "batch_size": plan.batch_size,
        "max_new_tokens": plan.max_new_tokens,
        "instruction": plan.instruction,
        "greedy": True,
        "budgets": plan.budgets or DEFAULT_BUDGETS,
        "methods": [meta(c) for c in configs],
    }


def write_outputs(document: dict, out: str | Path, console=None) -> None:
    """``eval.json`` and a plot in ``out``; the table also on the console."""
    from rich.console import Console

    from .report import (
        accuracy_table,
        fidelity_table,
        missed_budgets,
        plot_by_size,
        plot_vs_budget,
        size_table,
    )

    console = console or Console()
    wide = Console(width=max(120, console.width))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    document["budget_misses"] = missed_budgets(document["rows"])
    (out / "eval.json").write_text(json.dumps(document, indent=1, default=str))
    s, rows = document["settings"], document["rows"]
    title = f"{s['model']} | {s['device']} {s['dtype']} {s['attention']} | {s['samples']} samples, greedy"
    if document["mode"] == "accuracy":
        wide.print(accuracy_table(rows, title))
        plot_vs_budget(rows, "accuracy", "accuracy", out / "accuracy_vs_budget.png", title)
        names = "eval.json, accuracy_vs_budget.png"
        if any("by_size" in r for r in rows):
            wide.print(size_table(rows, f"accuracy by object size (patches) | {title}"))
            plot_by_size(rows, out / "accuracy_by_size.png", title)
            names += ", accuracy_by_size.png"
    else:
        wide.print(fidelity_table(rows, title))
        ylabel = "answers identical to unpruned"
        plot_vs_budget(rows, "identical", ylabel, out / "fidelity_vs_budget.png", title)
        names = "eval.json, fidelity_vs_budget.png"
    for line in document["budget_misses"]:
        console.print(f"[yellow]budget not reached:[/] {line}", highlight=False)
    console.print(f"wrote {out}/{names}")
