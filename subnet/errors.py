"""The exceptions that end a run with one line instead of a traceback, and the exit codes they map to.

- ``UsageError`` (a ValueError, as timm's ``train.main()`` raises ValueError for a configuration it refuses): a bad
  command line (a flag, a config file, a combination of options). It is raised only by ``train.py``,
  ``validate.py`` and the option-parsing layer (``timm_options.py``, ``subnet_options.py``, ``option_ranges.py``,
  ``checks.py``); the scripts' command line (``cli``) prints it as a single ``error: ...`` line on stderr, exit
  status 2. A command line that does not parse (argparse, the ``-c`` file) exits 2 from the parse itself.
- ``InputError`` (a ValueError; ``ModelNotSupported`` is one): the library's error for what the user gave that it
  cannot use (a model, a file, a dataset with too many unreadable images, a method's options); every other module
  raises it (or ValueError/TypeError for misuse of its API), and the scripts report it as they report a UsageError.
- ``RunStopped``: the run ended early on purpose, after doing what it could to lose nothing: a signal
  (128 + the signal's number, as a shell reports a process killed by it: 130 for SIGINT, 143 for SIGTERM,
  138 for SIGUSR1) or a loss that is no longer finite (3).
- ``WriteFailed`` (a ``RunStopped``): a checkpoint could not be written (disk full, permissions, read-only file
  system): 4, or 128 + N after stop signal N.

Anything else is a bug and keeps its traceback.
"""
import sys

EXIT_USAGE = 2
EXIT_NONFINITE = 3
EXIT_WRITE_FAILED = 4


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-line reports."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def report_bad_input(script: str, error: ValueError) -> int:
    """A script's command line on a UsageError or InputError: its one ``<script>: error:`` line on stderr, and the
    exit status (2). An error raised in a DataLoader worker arrives wrapped in the worker's traceback: its last
    line is the original message."""
    message = str(error)
    if 'Original Traceback' in message:
        message = message.strip().splitlines()[-1].split('Error: ', 1)[-1]  # drop 'subnet.errors.InputError: '
    print(f'{script}: error: {message}', file=sys.stderr)
    return EXIT_USAGE


class UsageError(ValueError):
    """A problem with the user's input, reported as one line without a traceback."""


class InputError(ValueError):
    """The library's error for what the user gave that it cannot use (a model, a file, a missing package);
    train.py and validate.py report it as one line, like a UsageError."""


class ModelNotSupported(InputError):
    """The library cannot run this model as asked (no skippable residual block, a dry forward that fails at the
    given input size)."""


class RunStopped(Exception):
    """The run stopped before its end (a signal, a non-finite loss): one line, a documented exit code."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class WriteFailed(RunStopped):
    """A checkpoint (or summary row) could not be written; the run folder keeps what it held before."""
