"""Errors that are the user's to fix: one line naming the culprit."""


class UserError(ValueError):
    """Bad input (a path, a key, a value, an id); scripts print it and exit 2."""


_main_failed = False


def main_failed() -> bool:
    """True once ``run_main``'s function has raised (exit handlers then skip
    work that waits on other processes, which may be gone)."""
    return _main_failed


def run_main(main_fn):
    """Call ``main_fn()``; a UserError becomes a one-line message and exit code 2."""
    import sys

    global _main_failed
    try:
        return main_fn()
    except UserError as err:
        _main_failed = True
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except BaseException:
        _main_failed = True
        raise
