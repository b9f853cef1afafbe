"""The exceptions that end a run with one line instead of a traceback, and the exit codes they map to.

- ``UsageError``: a problem with the user's input (bad flag, bad model, bad file, a dataset with too many unreadable
  images). ``train.py`` and ``validate.py`` print it as a single ``error: ...`` line on stderr, exit status 2.
- ``RunStopped``: the run ended early on purpose, after doing what it could to lose nothing: a signal
  (128 + the signal's number, as a shell reports a process killed by it: 130 for SIGINT, 143 for SIGTERM,
  138 for SIGUSR1) or a loss that is no longer finite (3).
- ``WriteFailed`` (a ``RunStopped``): a checkpoint could not be written (disk full, permissions, read-only file
  system): 4, or 128 + N after stop signal N.

Anything else is a bug and keeps its traceback.
"""

EXIT_USAGE = 2
EXIT_NONFINITE = 3
EXIT_WRITE_FAILED = 4


class UsageError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


class RunStopped(Exception):
    """The run stopped before its end (a signal, a non-finite loss): one line, a documented exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class WriteFailed(RunStopped):
    """A checkpoint (or summary row) could not be written; the run folder keeps what it held before."""
