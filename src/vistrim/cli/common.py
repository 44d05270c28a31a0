"""Pieces shared by the CLI commands: one-line argument errors, settings, configs, output paths.

Importing this module loads neither torch nor transformers: a usage error is answered before they load.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import sys
import tempfile
from pathlib import Path

from ..errors import VistrimError


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and exits with status 2."""

    def error(self, message: str) -> None:
        self.exit(2, f"vistrim: error: {message}\n")


def add_model_args(parser: argparse.ArgumentParser, default: str = "testbed") -> None:
    parser.add_argument(
        "--model",
        default=default,
        help="testbed | testbed2 | llava-geometry | llava-geometry-672 | tiny | a local folder | "
        "a hub id (default: %(default)s)",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    parser.add_argument(
        "--dtype", default="float32", help="float32 | bfloat16 | float16 (default: %(default)s)"
    )
    parser.add_argument(
        "--attn", default="sdpa", help="attention backend the model runs with (default: sdpa)"
    )


def add_method_args(parser: argparse.ArgumentParser, several: bool = False) -> None:
    """--set and --config: defaults < the config file's [method] table < --set (< a method spec's
    own name:key=value, with several methods)."""
    where = "; KEY applies to every selected method that has it, METHOD.KEY to one" if several else ""
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a method setting (repeatable); values are typed by the method's fields{where}",
    )
    parser.add_argument("--config", help="TOML file: a [method-name] table of settings per method")


def selected_specs(text: str, args) -> list:
    """The ``--methods`` specs with their settings: defaults < ``--config`` [name] table < ``--set``
    (``key=value`` for every selected method that has the setting, ``name.key=value`` for one) <
    the spec's own ``name:key=value``. Every result is type-checked now, before any model loads."""
    from ..bench.specs import MethodSpec, parse_method_specs
    from ..methods import REGISTRY, build

    specs = parse_method_specs(text)
    config = load_config(args.config)
    overrides = {name: {} for name in {spec.name for spec in specs}}
    for key, value in parse_settings(args.settings).items():
        name, dot, field = key.rpartition(".")
        targets = [name] if dot else [n for n in overrides if field in _fields(REGISTRY[n])]
        if dot and name not in overrides:
            raise VistrimError(
                f"--set {key}: {name!r} is not among the selected methods ({', '.join(overrides)})"
            )
        if dot and field not in _fields(REGISTRY[name]):
            hint = suggest(field, _fields(REGISTRY[name]))
            raise VistrimError(f"--set {key}: method {name!r} has no setting {field!r}{hint}")
        if not targets:
            raise VistrimError(f"--set {key}: no selected method has a setting {field!r}")
        for target in targets:
            overrides[target][field] = value
    merged = []
    for spec in specs:
        settings = {**config.get(spec.name, {}), **overrides[spec.name], **spec.settings}
        build(spec.name, **settings)
        merged.append(MethodSpec(spec.label, spec.name, settings))
    return merged


def _fields(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def parse_settings(pairs: list[str]) -> dict[str, str]:
    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise VistrimError(f"--set needs KEY=VALUE, got {pair!r}")
        settings[key.strip()] = value.strip()
    return settings


def load_config(path: str | None) -> dict:
    """The TOML file's tables, each checked now: it must name a method, its keys must be that
    method's settings and its values must fit them (a typo is an error, never silently ignored)."""
    if path is None:
        return {}
    import tomllib

    from ..io import read_text

    file = Path(path).expanduser()
    text = read_text(file, "config file")
    try:
        config = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise VistrimError(f"cannot read config {file}: {error}") from None
    for name, table in config.items():
        check_table(file, name, table)
    return config


def check_table(file: Path, name: str, table) -> None:
    from ..methods import REGISTRY, build

    if not isinstance(table, dict):
        raise VistrimError(
            f"config {file}: {name!r} is not a [method-name] table (settings go inside a table like [fastv])"
        )
    if name not in REGISTRY:
        raise VistrimError(f"config {file}: [{name}] is not a method{suggest(name, REGISTRY)}")
    fields = [f.name for f in dataclasses.fields(REGISTRY[name])]
    for key in table:
        if key not in fields:
            raise VistrimError(
                f"config {file}: [{name}] has no setting {key!r}{suggest(key, fields)} "
                f"(settings: {', '.join(fields) or 'none'})"
            )
    try:
        build(name, **table)
    except VistrimError as error:
        raise VistrimError(f"config {file}: {error}") from None


def suggest(word: str, choices) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else f" (available: {', '.join(choices)})"


def make_method(name: str, config: dict, overrides: dict[str, str]):
    """Defaults < the config file's [name] table < command-line overrides."""
    from ..methods import build

    return build(name, **{**config.get(name, {}), **overrides})


def check_output_file(path: str | Path, option: str) -> Path:
    """``path`` can be written as a file (created or replaced): checked before any work starts."""
    file = Path(path).expanduser()
    if file.is_dir():
        raise VistrimError(f"{option} {file} is a folder; give a file name")
    if file.exists():
        if not os.access(file, os.W_OK):
            raise VistrimError(f"{option} {file}: the file is not writable")
        return file
    _check_writable_parent(file, option)
    return file


def check_output_dir(path: str | Path, option: str) -> Path:
    """``path`` is, or can be created as, a writable folder: checked before any work starts."""
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise VistrimError(f"{option} {folder} is an existing file; give a folder for the results")
    if folder.is_dir():
        _probe(folder, folder, option)
        return folder
    _check_writable_parent(folder, option)
    return folder


def _check_writable_parent(path: Path, option: str) -> None:
    """The nearest existing ancestor of ``path`` is a folder this process can create entries in."""
    ancestor = path.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise VistrimError(f"{option} {path}: {ancestor} is a file, not a folder")
    _probe(ancestor, path, option)


def _probe(folder: Path, path: Path, option: str) -> None:
    """Create and delete a file in ``folder``: the only check that also holds for root, read-only
    mounts and network file systems."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise VistrimError(f"{option} {path}: cannot write in {folder} ({error.strerror or error})") from None


def fail(message: str, code: int = 2) -> int:
    print(f"vistrim: error: {message}", file=sys.stderr)
    return code


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"
