"""User-facing errors.

A `FedMKTError` is something the user can fix (a config key, a missing file, an empty dataset).
Its message is one line that names the problem and the fix; the CLI prints it without a
traceback (unless `--debug`) and exits non-zero.
"""


class FedMKTError(Exception):
    """A problem with the user's input, worded as '<what is wrong>. Fix: <what to do>'."""
