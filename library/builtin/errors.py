"""The one exception type the built-in backend raises for user mistakes; trainer.main prints it and returns 2."""


class UserError(Exception):
    """A problem with the command line, a config file, the dataset, the model or the output folder.

    The message says what is wrong and names the flag, file or folder; no traceback is shown for it.
    """
