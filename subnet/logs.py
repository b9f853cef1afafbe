"""Console and file logging for train.py and validate.py, in timm's console format.

- INFO lines are printed bare, as timm prints them (log parsers expect its ``Train:`` / ``Test:`` lines); other
  levels get a ``LEVEL:`` prefix.
- A terminal progress line (``subnet/progress.py``) is cleared before a log line is written.
- Rank 0 of train.py buffers records until the run folder exists, then writes the whole log, including those
  early lines, to ``log.txt``.
"""
import logging
import logging.handlers

from . import progress

__all__ = ['setup_logging', 'log_to_file', 'close_log_file']


class _ConsoleFormatter(logging.Formatter):
    """INFO lines bare (timm's console format, which log parsers expect), others as ``LEVEL: message``."""

    def format(self, record):
        message = record.getMessage()
        return message if record.levelno == logging.INFO else f'{record.levelname}: {message}'


class _ConsoleHandler(logging.StreamHandler):
    """Clears the terminal progress line before a log line is written."""

    def emit(self, record):
        progress.clear()
        super().emit(record)


def setup_logging(primary: bool, to_file_later: bool = False) -> None:
    """Console logging as timm sets it up; with ``to_file_later`` rank 0 buffers records for ``log_to_file``."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, '_subnet', False):
            root.removeHandler(handler)
    console = _ConsoleHandler()
    console.setFormatter(_ConsoleFormatter())
    console._subnet = True
    root.addHandler(console)
    root.setLevel(logging.INFO if primary else logging.WARNING)
    if primary and to_file_later:
        buffer = logging.handlers.MemoryHandler(capacity=1 << 20, flushLevel=logging.CRITICAL + 1)
        buffer._subnet = True
        buffer._pending_log = True
        root.addHandler(buffer)


def log_to_file(path: str) -> None:
    """Append the log (including what was logged before the run folder existed) to ``path``."""
    root = logging.getLogger()
    file_handler = logging.FileHandler(path, mode='a')
    file_handler.setFormatter(logging.Formatter('%(asctime)s %(levelname)s %(message)s'))
    file_handler._subnet = True
    for handler in list(root.handlers):
        if getattr(handler, '_pending_log', False):
            handler.setTarget(file_handler)
            handler.flush()
            root.removeHandler(handler)
            handler.close()
    root.addHandler(file_handler)


def close_log_file() -> None:
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, (logging.FileHandler, logging.handlers.MemoryHandler)) and getattr(
                handler, '_subnet', False):
            root.removeHandler(handler)
            handler.close()
