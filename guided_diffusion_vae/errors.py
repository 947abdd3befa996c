"""Errors that are the user's to fix: one line naming the culprit."""


class UserError(ValueError):
    """Bad input (a path, a key, a value, an id); scripts print it and exit 2."""


def run_main(main_fn):
    """Call ``main_fn()``; a UserError becomes a one-line message and exit code 2."""
    import sys

    try:
        return main_fn()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
