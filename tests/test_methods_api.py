"""The method API: registry, typed settings, one-line errors."""

from __future__ import annotations

import pytest

import vistrim
from vistrim.methods.base import scale_layer


def test_registry_lists_methods_with_summaries():
    names = vistrim.list_methods()
    assert {"none", "random", "fastv", "pdrop"} <= set(names)
    for cls in names.values():
        assert cls.summary and cls.__doc__


def test_build_coerces_command_line_strings():
    fastv = vistrim.build("fastv", layer="3", keep="64")
    assert fastv.layer == 3 and fastv.keep == 64 and isinstance(fastv.keep, int)
    fastv = vistrim.build("fastv", keep="0.25")
    assert fastv.keep == 0.25 and isinstance(fastv.keep, float)
    assert vistrim.build("random", seed="7").seed == 7
    assert vistrim.build("pdrop").settings() == {
        "stages": 4,
        "ratio": 0.5,
        "official": False,
        "rank": "this",
        "positions": "original",
        "rounding": "ceil",
    }


@pytest.mark.parametrize(
    ("name", "settings", "message"),
    [
        ("nope", {}, "unknown method 'nope'"),
        ("fastv", {"ratio": 0.5}, "has no setting 'ratio'"),
        ("fastv", {"keep": 1.5}, "out of range"),
        ("fastv", {"keep": -3}, "out of range"),
        ("fastv", {"keep": "lots"}, "must be"),
        ("fastv", {"layer": "2.5"}, "must be an integer"),
        ("fastv", {"layer": True}, "must be an integer"),
        ("pdrop", {"ratio": 2.0}, "out of range"),
        ("pdrop", {"stages": 0}, "out of range"),
        ("random", {"keep": float("nan")}, "must be"),
    ],
)
def test_bad_settings_give_one_line_errors(name, settings, message):
    with pytest.raises(vistrim.VistrimError, match=message) as info:
        vistrim.build(name, **settings)
    assert "\n" not in str(info.value)


def test_model_dependent_checks(tiny):
    model, _ = tiny
    with pytest.raises(vistrim.VistrimError, match="6 decoder layers"):
        vistrim.apply(model, "fastv", layer=6)
    with pytest.raises(vistrim.VistrimError, match="out of range"):
        vistrim.apply(model, "fastv", layer=0)
    with pytest.raises(vistrim.VistrimError, match="pdrop.stages"):
        vistrim.apply(model, "pdrop", stages=7)
    # nothing was left installed by the failed attempts
    session = vistrim.apply(model, "none")
    vistrim.remove(model)
    assert session


def test_unsupported_model_is_one_line():
    import torch

    with pytest.raises(vistrim.VistrimError, match="unsupported model Linear"):
        vistrim.apply(torch.nn.Linear(2, 2), "fastv")


def test_scale_layer_to_depth():
    assert scale_layer(2, 32, 32) == 2
    assert scale_layer(8, 32, 24) == 6
    assert scale_layer(16, 32, 40) == 20
    assert scale_layer(3, None, 40) == 3


@pytest.mark.parametrize("name", ["fastv", "random", "pdrop", "st3", "none"])
@pytest.mark.parametrize("budget", [0.5, 0.4, 40])
def test_budget_mode_predicts_the_runtime_and_meets_the_target(tiny, batch, name, budget):
    import torch

    model, _ = tiny
    method = vistrim.at_budget(name, budget, n_visual=64, num_layers=6)
    predicted = method.predict_prefill(64, 6)
    with vistrim.trim(model, method) as session, torch.no_grad():
        model(**batch)
    assert session.stats.prefill_visual()[:, 0].tolist() == predicted
    target = budget * 64 if isinstance(budget, float) else budget
    if name == "none":
        assert session.stats.layer_average_mean() == 64
    else:
        # integer counts and ceil rounding: within one token per layer of the request
        assert abs(session.stats.layer_average_mean() - target) <= 1.0


@pytest.mark.parametrize("name", ["fastv", "random", "pdrop", "st3"])
def test_low_budgets_move_the_first_cut_earlier(name):
    """On a shallow model a low budget is out of reach at the default first cut; the budget mode
    cuts earlier instead of stopping short (and keeps the default cut when it can)."""
    method = vistrim.at_budget(name, 24, n_visual=144, num_layers=8)  # default first cut: >= 36
    assert abs(sum(method.predict_prefill(144, 8)) / 8 - 24) <= 1.0
    default = vistrim.build(name)
    generous = vistrim.at_budget(name, 100, n_visual=144, num_layers=8)
    assert generous.settings().get("layer") == default.settings().get("layer")
    assert generous.settings().get("start_layer") == default.settings().get("start_layer")


def test_budget_out_of_range():
    with pytest.raises(vistrim.VistrimError, match="budget"):
        vistrim.at_budget("fastv", 1.5, n_visual=64, num_layers=6)


def test_methods_subpackage_is_importable_next_to_the_registry_function():
    import importlib

    module = importlib.import_module("vistrim.methods")
    assert vistrim.methods is module and hasattr(module, "REGISTRY")
    assert vistrim.list_methods() == dict(module.REGISTRY)


def test_trim_exit_removes_its_own_session_only(tiny):
    from conftest import no_hooks

    model, _ = tiny
    with vistrim.trim(model, "fastv") as first:
        vistrim.remove(model)  # the user removes it inside the block ...
        second = vistrim.apply(model, "random")  # ... and applies another one
    # leaving the first block must not remove the second session
    assert not no_hooks(model) and second._handles and not first._handles
    vistrim.remove(model)
    assert no_hooks(model)
    with pytest.raises(RuntimeError), vistrim.trim(model, "fastv"):  # hooks gone after an exception
        raise RuntimeError("boom")
    assert no_hooks(model)
