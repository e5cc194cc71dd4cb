"""The one exception type the library raises for bad input."""


class UserError(Exception):
    """Bad input from a user: a file, key, shape, flag or value that is wrong.

    The message is one line that names the culprit; the CLI prints it as is and exits
    non-zero, without a traceback.
    """
