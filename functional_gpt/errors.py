"""The exception types the library raises for bad input."""


class UserError(Exception):
    """Bad input from a user: a file, key, shape, flag or value that is wrong.

    The message is one line that names the culprit; the CLI prints it as is and exits
    non-zero, without a traceback. A line break in what it quotes (a path or a prompt may
    hold one) is written as \\n, so the message stays one line whatever it names.
    """

    def __init__(self, message: str = ""):
        super().__init__(str(message).replace("\r", "\\r").replace("\n", "\\n"))


class AgreedError(UserError):
    """A UserError every rank of a data-parallel job raises alike (from the same flags and
    data): rank 0 alone says it, so a job of N processes prints it once."""
