"""Pieces shared by the CLI commands: one-line argument errors, settings, configs, model loading."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import VistrimError
from ..methods import Method, build

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump) and exits with status 2."""

    def error(self, message: str) -> None:
        self.exit(2, f"vistrim: error: {message}\n")


def add_model_args(parser: argparse.ArgumentParser, default: str = "testbed") -> None:
    parser.add_argument(
        "--model",
        default=default,
        help="testbed | llava-geometry | tiny | a local folder | a hub id (default: %(default)s)",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    parser.add_argument(
        "--dtype", default="float32", help="float32 | bfloat16 | float16 (default: %(default)s)"
    )
    parser.add_argument(
        "--attn", default="sdpa", help="attention backend the model runs with (default: sdpa)"
    )


def add_method_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        dest="settings",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a method setting (repeatable); values are typed by the method's fields",
    )
    parser.add_argument("--config", help="TOML file: a [method-name] table of settings per method")


def parse_settings(pairs: list[str]) -> dict[str, str]:
    settings = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise VistrimError(f"--set needs KEY=VALUE, got {pair!r}")
        settings[key.strip()] = value.strip()
    return settings


def load_config(path: str | None) -> dict:
    if path is None:
        return {}
    file = Path(path).expanduser()
    if not file.is_file():
        raise VistrimError(f"config file not found: {file}")
    try:
        return tomllib.loads(file.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise VistrimError(f"cannot read config {file}: {error}") from None


def make_method(name: str, config: dict, overrides: dict[str, str]) -> Method:
    """Defaults < the config file's [name] table < command-line overrides."""
    table = config.get(name, {})
    if not isinstance(table, dict):
        raise VistrimError(f"config: [{name}] must be a table of settings")
    return build(name, **{**table, **overrides})


def fail(message: str, code: int = 2) -> int:
    print(f"vistrim: error: {message}", file=sys.stderr)
    return code


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GB"
