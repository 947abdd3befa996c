"""The ``--help`` line of every flag, from descriptions kept beside the defaults.

A module that introduces flags (a public function ``*_defaults()`` returning
a dict) describes them right below that function in ``FLAG_HELP``
(``{flag: one-line description}``) and, for flags that take one of a few
values, lists the values in ``FLAG_CHOICES`` (``{flag: (value, ...)}``),
built from the table the code itself checks against so the two cannot drift.
``config.parse_with_config`` and ``script_util.add_dict_to_argparser`` ask
:func:`help_lines` for the text; scripts write none of their own.

One name can mean different things in different programs (the
``batch_size`` of training and of sampling). A program's flag dict is a
merge of ``*_defaults()`` dicts, so the functions whose flags all lie inside
it are the ones it was built from; of their modules, the one with the
largest such function (the outermost, most specific) describes a flag
first. This module imports nothing of the package: it reads the modules
already imported, and whoever built a flag dict has imported its makers.
"""

import sys

PACKAGE = __name__.split(".")[0]


def _defaults_functions(module):
    """The ``*_defaults`` functions a module defines (not those it imports)."""
    for attr, value in list(vars(module).items()):
        if (attr.endswith("_defaults") and not attr.startswith("_") and callable(value)
                and getattr(value, "__module__", None) == module.__name__):
            yield value


def _sources(keys):
    """``(size, module name, FLAG_HELP, FLAG_CHOICES)`` of each loaded module
    with a ``*_defaults()`` whose flags all lie in ``keys``, least specific first."""
    found = []
    for name, module in list(sys.modules.items()):
        if module is None or not (name == PACKAGE or name.startswith(PACKAGE + ".")):
            continue
        if module.__name__ != name:  # an old flat name of a moved module: seen under its own name
            continue
        helps = getattr(module, "FLAG_HELP", None)
        if not isinstance(helps, dict):
            continue
        sizes = [len(flags) for flags in (fn() for fn in _defaults_functions(module))
                 if isinstance(flags, dict) and set(flags) <= keys]
        if sizes:
            found.append((max(sizes), name, helps, getattr(module, "FLAG_CHOICES", {})))
    return sorted(found, key=lambda source: source[:2])


def describe(flags):
    """``({flag: description}, {flag: choices})`` for the flags of a flag dict;
    a flag nobody describes is absent."""
    keys = set(flags)
    texts, choices = {}, {}
    for _, _, helps, values in _sources(keys):
        texts.update((k, v) for k, v in helps.items() if k in keys)
        choices.update((k, tuple(v)) for k, v in values.items() if k in keys)
    return texts, choices


def _escaped(text):
    # argparse expands %(...)s in help text; a literal % must be doubled.
    return str(text).replace("%", "%%")


def help_line(description, choices=()):
    """argparse help text: the description, then the choices and the default."""
    if description is None:
        return None
    # " | " between values: some hold commas (input_range -1,1).
    tail = [f"choices: {' | '.join(_escaped(c) for c in choices)}"] if choices else []
    return f"{_escaped(description)} ({'; '.join(tail + ['default: %(default)r'])})"


def help_lines(flags, extra=None):
    """``{flag: help text or None}`` for every flag of ``flags``; ``extra``
    (``{flag: description}``) describes flags a script defines itself."""
    texts, choices = describe(flags)
    texts.update(extra or {})
    return {key: help_line(texts.get(key), choices.get(key, ())) for key in flags}
