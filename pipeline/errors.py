"""The one exception type for a user's mistake.

A ``UserError`` carries a single line that names the file, the field, what was expected and
what was found. The CLI prints it as ``error: <message>`` and exits with status 2, without a
traceback. Bugs in the code raise ordinary exceptions.
"""


class UserError(ValueError):
    """A mistake in the user's input (file, option, data): reported in one line, exit 2.

    A ``ValueError``, so library callers (e.g. of ``pipeline.losses``) can catch it as one.

    torch re-raises an exception from a DataLoader worker in the main process as
    ``type(err)(text)``, the text holding the worker's whole traceback; the original one-line
    message is recovered from its last line, so the error stays one line wherever it arose.
    """

    def __init__(self, message: str):
        text = str(message)
        if "Original Traceback" in text:
            last = text.rstrip().splitlines()[-1]
            prefix = f"{type(self).__module__}.{type(self).__qualname__}: "
            text = last[len(prefix):] if last.startswith(prefix) else last
        super().__init__(" ".join(text.split()))


class DataError(UserError):
    """A data or view problem: a missing or undecodable image, a bad view spec (stays one line
    when raised inside a DataLoader worker, like every ``UserError``)."""
