"""The transformers range: declared = tested, names that moved looked up once, one-line messages."""

from __future__ import annotations

import importlib.metadata
import logging
import re
import tomllib
import warnings
from pathlib import Path

import pytest
import torch
from conftest import encode, greedy, run_cli
from packaging.specifiers import SpecifierSet
from packaging.version import Version

import vistrim
from vistrim import compat

ROOT = Path(__file__).resolve().parents[1]


def declared_transformers() -> SpecifierSet:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    (requirement,) = [d for d in project["dependencies"] if re.match(r"transformers\b", d)]
    return SpecifierSet(requirement[len("transformers") :])


def test_declared_range_is_exactly_the_tested_range():
    declared = declared_transformers()
    assert str(declared) == str(SpecifierSet(compat.tested_range()))
    for minor in compat.TESTED:
        assert Version(f"{minor}.0") in declared and Version(f"{minor}.99") in declared
    low, high = Version(compat.TESTED[0]), Version(compat.TESTED[-1])
    assert Version(f"{low.major}.{low.minor - 1}.99") not in declared
    assert Version(f"{high.major}.{high.minor + 1}.0") not in declared
    # the tested releases are consecutive minors: nothing inside the range goes untested
    minors = [Version(m).minor for m in compat.TESTED]
    assert minors == list(range(minors[0], minors[-1] + 1))


def test_the_running_release_is_a_tested_one():
    """CI runs the suite on each tested release; a run on anything else is not a test of the range."""
    version = Version(importlib.metadata.version("transformers"))
    assert compat.is_tested(version), f"transformers {version} is outside {compat.TESTED}"


def test_ci_installs_the_oldest_tested_release():
    script = (ROOT / ".ci" / "run").read_text()
    assert "vistrim.compat" in script and "TESTED[0]" in script  # the version comes from one place


@pytest.mark.parametrize("version", ["5.26.0", "5.30.1", "6.0.0.dev0"])
def test_newer_untested_release_warns_in_one_line(version):
    compat._warn_once.cache_clear()
    if Version(version).major != 5:
        with pytest.raises(vistrim.VistrimError, match=re.escape(version)):
            compat.check_transformers(Version(version))
        return
    with pytest.warns(compat.VistrimWarning) as record:
        compat.check_transformers(Version(version))
    (message,) = [str(w.message) for w in record]
    assert version in message and "5.23, 5.24, 5.25" in message and compat.tested_range() in message
    assert "\n" not in message


@pytest.mark.parametrize("version", ["5.22.2", "5.0.0", "4.57.6"])
def test_older_release_is_refused_in_one_line(version):
    with pytest.raises(vistrim.VistrimError) as info:
        compat.check_transformers(Version(version))
    assert version in str(info.value) and compat.tested_range() in str(info.value)
    assert "\n" not in str(info.value)


def test_trim_warns_once_on_untested_release_and_still_works(tiny, monkeypatch):
    model, processor = tiny
    compat._warn_once.cache_clear()
    monkeypatch.setattr(compat, "installed", lambda: Version("5.26.0"))
    inputs = encode(processor, ["USER: <image>\nWhat is it? ASSISTANT:"])
    with pytest.warns(compat.VistrimWarning, match="5.26.0"):
        with vistrim.trim(model, "fastv", keep=0.5):
            greedy(model, inputs, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", compat.VistrimWarning)
        with vistrim.trim(model, "fastv", keep=0.5):  # once per process
            pass


def test_trim_refuses_old_release_and_leaves_model_untouched(tiny, monkeypatch):
    from conftest import no_hooks

    model, _ = tiny
    monkeypatch.setattr(compat, "installed", lambda: Version("5.17.0"))
    with pytest.raises(vistrim.VistrimError, match="5.17.0"):
        with vistrim.trim(model, "fastv"):
            pass
    assert no_hooks(model)


def test_cli_names_version_and_range(capsys, monkeypatch):
    monkeypatch.setattr(compat, "installed", lambda: Version("5.22.0"))
    code, out, err = run_cli(capsys, "run", "--model", "tiny", "--image", "x.png", "--prompt", "hi")
    assert code != 0 and "internal error" not in err
    assert err.count("\n") == 1 and "5.22.0" in err and compat.tested_range() in err
    compat._warn_once.cache_clear()
    monkeypatch.setattr(compat, "installed", lambda: Version("5.26.0"))
    image = ROOT / "src" / "vistrim" / "assets" / "samples" / "blue-circle.png"
    code, out, err = run_cli(
        capsys, "run", "--model", "tiny", "--image", str(image), "--prompt", "what?", "--max-new-tokens", "2"
    )
    assert code == 0, err
    assert [line for line in err.splitlines() if line] == [err.splitlines()[0]]
    assert err.startswith("vistrim: warning: transformers 5.26.0 is not tested")


def test_cache_names_come_from_the_installed_signatures(tiny):
    model, _ = tiny
    core = model.model
    installed = Version(importlib.metadata.version("transformers"))
    name = compat.cache_keyword(core.forward)
    assert name in compat.CACHE_NAMES
    assert name == compat.cache_keyword(core.language_model.forward)
    expected = "cache" if installed >= Version("5.24") else "past_key_values"
    assert name == expected


def test_cache_argument_moves_a_deprecated_name():
    argument = compat.CacheArgument("cache")
    kwargs = {"past_key_values": "old"}
    assert argument.take(kwargs) == "old" and kwargs == {"cache": "old"}
    kwargs = {"past_key_values": "old", "cache": None}
    assert argument.take(kwargs) == "old"
    argument.put(kwargs, "ours")
    assert kwargs == {"cache": "ours"}


class _Capture(logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_no_deprecation_warnings_in_normal_use(tiny, batch):
    """generate, a direct forward with the cache, a forward without cache, under every stage."""
    model, _ = tiny
    capture = _Capture()
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(capture)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for method, settings in [("fastv", {"keep": 0.25}), ("mustdrop", {}), ("st3", {})]:
                with vistrim.trim(model, method, **settings), torch.no_grad():
                    greedy(model, batch, 3)
                    first = model(**batch)
                    token = first.logits[:, -1:].argmax(-1)
                    mask = torch.cat([batch["attention_mask"], torch.ones_like(token)], 1)
                    model(
                        input_ids=token,
                        attention_mask=mask,
                        **compat.cache_kwargs(model, compat.output_cache(first)),
                    )
                    model(**batch, use_cache=False)
    finally:
        hf_logger.removeHandler(capture)
    deprecations = [
        str(w.message)
        for w in caught
        if issubclass(w.category, (DeprecationWarning, FutureWarning)) or "deprecat" in str(w.message).lower()
    ]
    assert deprecations == []
    assert [m for m in capture.messages if "deprecat" in m.lower()] == []


def test_vistrim_loaders_never_kernelize(tiny, tmp_path, monkeypatch):
    """5.25 made ``from_pretrained`` kernelize by default (hub kernels, code fetched for the device);
    vistrim's loaders pass ``use_kernels=False`` on every tested release, even with hub kernels
    switched on in the environment, so a model loads the same everywhere."""
    from vistrim.models import load_model

    monkeypatch.setenv("USE_HUB_KERNELS", "1")
    model, processor = tiny
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert compat.LOAD_OPTIONS == {"use_kernels": False}
    for spec in (str(tmp_path), "testbed"):
        loaded, _ = load_model(spec)
        assert not getattr(loaded, "use_kernels", False), spec
