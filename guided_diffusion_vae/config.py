"""YAML configuration files whose keys are the command-line flags.

Precedence: built-in defaults < ``--config FILE`` < explicit flags. A key the
program does not know is refused with the closest valid name, a value of the
wrong type names the key and the type expected, so a typo never silently
leaves a default in force.
"""

import argparse
import difflib
import os
import re
import sys

import yaml

from .errors import UserError, set_debug
from .flag_help import help_lines
from .script_util import str2bool
from .files import atomic_write_bytes


def _suggest(key, valid, prefix=""):
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.6)
    return f"; did you mean '{prefix}{close[0]}'?" if close else ""


def _type_name(default):
    if isinstance(default, bool):
        return "a boolean"
    return {"int": "an integer", "float": "a number", "str": "a string", "list": "a list"}.get(
        type(default).__name__, type(default).__name__
    )


def coerce_value(key, value, default, source):
    """Check a YAML value against the type of its default and return it in
    that type. Comma-list strings (``attention_resolutions``) may be written
    as YAML lists or single numbers."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads 1e-4 (no dot) as a string; accept plain numbers.
            try:
                return float(value)
            except ValueError:
                pass
    elif isinstance(default, list):
        if isinstance(value, list):
            return [str(v) for v in value]
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return [str(v) for v in str(value).replace(",", " ").split()]
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, list) and all(isinstance(v, (int, float, str)) for v in value):
            return ",".join(str(v) for v in value)
    else:
        return value
    raise UserError(
        f"{source}: key '{key}' must be {_type_name(default)}, got {value!r} ({type(value).__name__})"
    )


def load_yaml_config(path, defaults):
    """Read ``path`` (``yaml.safe_load``) and check every key and value."""
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as err:
        first_line = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{path}: not valid YAML ({first_line})")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of flag names to values, got {type(data).__name__}")
    checked = {}
    for key, value in data.items():
        if key not in defaults:
            raise UserError(f"{path}: unknown key '{key}'{_suggest(str(key), defaults)}")
        checked[key] = coerce_value(key, value, defaults[key], path)
    return checked


def _parser_type(default):
    # Booleans have their own argument form (a bare --flag means True).
    return str if default is None else type(default)


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad flag value is a one-line UserError, not usage + exit."""

    def error(self, message):
        raise UserError(message)


def _attach_negative_values(argv, defaults):
    """``--db_range -60,0`` as ``--db_range=-60,0``: argparse takes a value
    that starts with "-" and is not a plain number for an unknown option. Only
    for single-valued flags (a list flag may be followed by more values)."""
    out, i = [], 0
    while i < len(argv):
        token = argv[i]
        name = token[2:] if token.startswith("--") and "=" not in token else None
        if (name in defaults and not isinstance(defaults[name], list) and i + 1 < len(argv)
                and re.match(r"-[\d.]", argv[i + 1])):
            out.append(f"{token}={argv[i + 1]}")
            i += 2
        else:
            out.append(token)
            i += 1
    return out


def parse_with_config(defaults, argv=None, description=None, helps=None):
    """Resolve the flags of a program whose defaults are ``defaults``.

    ``--help`` describes each flag from the ``FLAG_HELP`` beside its defaults
    (:mod:`flag_help`); ``helps`` adds descriptions of flags a script defines
    itself. Returns a plain dict with every key of ``defaults``
    plus ``config`` (the YAML path or ""). Unknown flags and keys raise
    :class:`UserError`.
    """
    argv = _attach_negative_values(sys.argv[1:] if argv is None else list(argv), defaults)
    pre = _Parser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config", default="")
    pre.add_argument("--debug", action="store_true")
    known, _ = pre.parse_known_args(argv)
    set_debug(known.debug)
    merged = dict(defaults)
    if known.config:
        merged.update(load_yaml_config(known.config, defaults))

    parser = _Parser(description=description, allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="", help="YAML file whose keys are these flags")
    parser.add_argument("--debug", action="store_true",
                        help="on an error, print the Python traceback as well as the one-line message")
    lines = help_lines(defaults, helps)
    for key, default in merged.items():
        if isinstance(defaults[key], list):
            parser.add_argument(f"--{key}", default=default, nargs="*", type=str, help=lines[key])
        elif isinstance(defaults[key], bool):
            # "--quick" alone means True; "--quick False" still works (the original's form).
            parser.add_argument(f"--{key}", default=default, type=str2bool, nargs="?", const=True,
                                help=lines[key])
        else:
            parser.add_argument(f"--{key}", default=default, type=_parser_type(defaults[key]), help=lines[key])
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = next(u for u in unknown if u.startswith("-")) if any(u.startswith("-") for u in unknown) else unknown[0]
        name = flag.lstrip("-").split("=")[0]
        raise UserError(f"unknown argument {flag}{_suggest(name, defaults, prefix='--')}")
    resolved = vars(args)
    resolved.pop("debug")
    return resolved


def write_resolved_config(config, directory, name="config.yaml"):
    """Write the resolved configuration beside the run's logs (atomically)."""

    text = yaml.safe_dump(dict(config), sort_keys=True)
    path = os.path.join(directory, name)
    atomic_write_bytes(path, text.encode("utf-8"))
    return path
