"""The one exception type for a user's mistake.

A ``UserError`` carries a single line that names the file, the field, what was expected and
what was found. The CLI prints it as ``error: <message>`` and exits with status 2, without a
traceback. Bugs in the code raise ordinary exceptions.
"""


class UserError(Exception):
    """A mistake in the user's input (file, option, data): reported in one line, exit 2."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
