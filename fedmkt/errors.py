"""User-facing errors.

A `FedMKTError` is something the user can fix (a config key, a missing file, an empty dataset).
Its message is one line that names the problem and the fix; the CLI prints it without a
traceback (unless `--debug`) and exits non-zero.
"""


class FedMKTError(Exception):
    """A problem with the user's input, worded as '<what is wrong>. Fix: <what to do>'."""


class RunInterrupted(BaseException):
    """SIGTERM or SIGINT arrived; raised from the signal handler so the run stops where it is.

    A `BaseException`, so neither a client's failure handling nor Lightning's error handling takes
    it for an ordinary error. `run_dir` is set once the run it interrupted is known, and `command`
    is the `fedmkt` subcommand that continues it.
    """

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum
        self.run_dir: str | None = None
        self.command = "fit"


def describe(error: BaseException) -> str:
    """`TypeName: message` on one line, at most 500 characters: how summary.json records a failure."""
    return f"{type(error).__name__}: {' '.join(str(error).split())}"[:500]
