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

from .errors import UserError, set_debug, shown
from .flag_help import help_lines
from .files import atomic_write_bytes


def str2bool(value):
    """argparse type for booleans written as yes/no, true/false, 1/0."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("yes", "true", "t", "y", "1"):
        return True
    if text in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {value!r}")


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
        f"{source}: key {shown(key)} must be {_type_name(default)}, got {shown(value)} ({type(value).__name__})"
    )


# Bounds on a config file: a flag file is a few hundred bytes; these leave
# room for any real one and stop hostile ones (a billion-laughs alias bomb of
# 393 bytes once expanded to gigabytes, a deep nesting overflowed the stack).
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_DEPTH = 32
MAX_CONFIG_NODES = 100_000  # values after expanding every alias


class _Refused(Exception):
    """A config file our loader will not read; the message names why."""


class _ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` (plain data only, no tags that run code) that also
    refuses a repeated key (YAML would let the last one win silently), a
    nesting deeper than MAX_CONFIG_DEPTH and a document whose aliases expand
    to more than MAX_CONFIG_NODES values."""

    def __init__(self, stream):
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_CONFIG_DEPTH:
                raise _Refused(f"nested deeper than {MAX_CONFIG_DEPTH} levels (line {self.peek_event().start_mark.line + 1})")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_document(self):
        node = super().compose_document()
        if _expanded_size(node, {}) > MAX_CONFIG_NODES:
            raise _Refused(f"its aliases (*name) expand to more than {MAX_CONFIG_NODES} values")
        return node

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)):
                continue  # an unhashable key is refused by SafeLoader itself
            if key in seen:
                raise _Refused(f"key {shown(key)} appears twice (again on line {key_node.start_mark.line + 1})")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node, sizes):
    """How many values ``node`` holds once every alias is copied out; each
    shared node is counted once (``sizes``), so this is quick even when the
    answer is astronomical."""
    if id(node) in sizes:
        return sizes[id(node)]
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(child, sizes) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
    else:
        size = 1
    sizes[id(node)] = size
    return size


def _read_config_text(path):
    """The text of ``path``: at most MAX_CONFIG_BYTES, UTF-8."""
    if not os.path.isfile(path):
        raise UserError(f"config file not found: {path}")
    with open(path, "rb") as f:
        data = f.read(MAX_CONFIG_BYTES + 1)
    if len(data) > MAX_CONFIG_BYTES:
        raise UserError(f"{path}: larger than {MAX_CONFIG_BYTES // 1024} KiB; a config file holds flags")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start})") from None


def load_yaml_config(path, defaults):
    """Read ``path`` (plain YAML data, bounded: :class:`_ConfigLoader`) and
    check every key and value."""
    text = _read_config_text(path)
    try:
        data = yaml.load(text, Loader=_ConfigLoader)
    except _Refused as why:
        raise UserError(f"{path}: {why}") from None
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
            raise UserError(f"{path}: unknown key {shown(key)}{_suggest(str(key)[:200], defaults)}")
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
