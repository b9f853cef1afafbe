"""A one-line epoch progress display with ETA, shown only when stdout is a terminal.

Log lines (timm's ``Train:``/``Test:`` format, kept for parsers) still go to the log; the console handler
calls ``clear()`` before writing one, so the two never mix on a line.
"""
import sys
import time

_active = {'text': ''}


def _stdout_is_terminal() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    return f'{hours}:{rest // 60:02d}:{rest % 60:02d}'


def clear() -> None:
    if _active['text']:
        sys.stdout.write('\r\x1b[K')
        sys.stdout.flush()
        _active['text'] = ''


class EpochProgress:
    """Tracks the rate of an epoch; ``eta`` for log lines, ``show`` for the terminal line."""

    def __init__(self, name: str, total: int, enabled: bool = True):
        self.name = name
        self.total = max(total, 1)
        self.enabled = enabled and _stdout_is_terminal()
        self.start = time.time()
        self.done_before = 0  # a resumed epoch: what was done before this process started on it

    def eta(self, done: int) -> float:
        elapsed = time.time() - self.start
        return elapsed / max(done - self.done_before, 1) * (self.total - done)

    def show(self, done: int, suffix: str = '') -> None:
        if not self.enabled:
            return
        width = 24
        filled = int(width * done / self.total)
        text = (f'{self.name} [{"#" * filled}{"." * (width - filled)}] {done}/{self.total} '
                f'ETA {format_duration(self.eta(done))} {suffix}')
        sys.stdout.write('\r\x1b[K' + text)
        sys.stdout.flush()
        _active['text'] = text

    def close(self) -> None:
        if self.enabled:
            clear()
