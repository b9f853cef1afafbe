"""The one exception type for mistakes a user can make (bad flag, bad model, bad file).

``train.py`` and ``validate.py`` print such an error as a single ``error: ...`` line on stderr and exit
with status 2; anything else is a bug and keeps its traceback.
"""


class UsageError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""
