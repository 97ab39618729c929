"""One-line errors for the headless commands: a user's mistake is one line, a bug keeps its traceback."""
import os
import sys

from .data import DataError
from .embedded import ModelError
from .launch import LaunchError
from .paramcheck import ParamsError
from .runs import RunError
from .trainer import TrainingDiverged

# What a user can cause and fix (bad params, data, model files, run folders, a diverging recipe); anything
# else is a bug.
USER_ERRORS = (ParamsError, DataError, ModelError, RunError, LaunchError, TrainingDiverged, ValueError,
               OSError)


class one_line_errors:
    """`with one_line_errors(hint) as cli:` ... then `return cli.code` (0, 1 for an error, 130 for Ctrl-C).

    CCT_DEBUG=1 lets every exception through with its traceback.
    """

    def __init__(self, resume_hint: str = ""):
        self.hint, self.code = resume_hint, 0

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if kind is None or os.environ.get("CCT_DEBUG"):
            return False
        if issubclass(kind, KeyboardInterrupt):
            print(f"\ninterrupted{'; ' + self.hint if self.hint else ''}", file=sys.stderr)
            self.code = 130
            return True
        if issubclass(kind, USER_ERRORS):
            print(f"error: {err}\n(CCT_DEBUG=1 shows the traceback)", file=sys.stderr)
            self.code = 1
            return True
        return False
