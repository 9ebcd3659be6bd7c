"""The one exception type the built-in backend raises for user mistakes (trainer.main prints it and
returns 2), and its one way to warn the user."""

import sys


class UserError(Exception):
    """A problem with the command line, a config file, the dataset, the model or the output folder.

    The message says what is wrong and names the flag, file or folder; no traceback is shown for it.
    """


def warn(message: str) -> None:
    """A warning for the user: one plain line on stderr (no Python warning with a source line)."""
    print(f"warning: {message}", file=sys.stderr, flush=True)
