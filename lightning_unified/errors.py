"""A named error reaches a user of the scripts as its one message, not after a traceback.

The package's errors name what to change (a config key, a file and its line, a server), so
the message is all a user needs; a traceback of fifty frames above it buries that line.
:func:`report_named_errors` wraps a script's work: a named error prints its message on
stderr, with a hint line, and the script exits with status 1; ``HYDRA_FULL_ERROR=1`` shows
the traceback instead, as Hydra's own errors do. Anything else (a bug) keeps its traceback.

Named: the package's own error classes (:data:`NAMED_ERRORS`), and the plain errors its
checks raise (:data:`CHECK_ERRORS` raised by a ``raise`` of this package, such as
``ValueError("data_source.probability must be in [0, 1], got 2")``). Hydra wraps an error
raised while it builds an object from a config; the error it wraps is the one reported.
"""

from __future__ import annotations

import contextlib
import linecache
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

# every error class the package defines for a user (module, class name), checked against
# the package by tests/test_cli_errors.py; RuntimeErrors of a run going wrong are named too
NAMED_ERRORS = (
    ("lightning_unified.typecheck", "ConfigError"),
    ("lightning_unified.rules", "RuleError"),
    ("lightning_unified.stages.order", "PipelineError"),
    ("lightning_unified.data.files", "DataError"),
    ("lightning_unified.data.conversations", "ConversationError"),
    ("lightning_unified.data.alignment", "AlignmentError"),
    ("lightning_unified.data.teacher_cache", "CacheMismatch"),
    ("lightning_unified.environments.base", "EnvironmentOutputError"),
    ("lightning_unified.environments.tools", "ToolSchemaError"),
    ("lightning_unified.callbacks.finite_guard", "NonFiniteError"),
    ("lightning_unified.failures", "TooManyFailedRows"),
    ("lightning_unified.engines.transfer.client", "ServerError"),
    ("lightning_unified.engines.transfer.pusher", "WeightPushError"),
    ("lightning_unified.teachers.server", "TeacherServerError"),
)
# the package's internal signal between its own threads, never a user's to read
INTERNAL_ERRORS = (("lightning_unified.rollouts.producer", "CancelledRollout"),)
# the kinds of plain error the package's checks raise with a message naming the key or file
CHECK_ERRORS = (ValueError, TypeError, FileNotFoundError, FileExistsError, NotADirectoryError, ImportError,
                NotImplementedError)
PACKAGE = Path(__file__).resolve().parent
HINT = "(HYDRA_FULL_ERROR=1 shows the traceback)"


def named_error(error: BaseException) -> BaseException | None:
    """The error to report as one message: ``error`` itself, or the one Hydra's
    ``InstantiationException`` wraps, when it is named; None for anything else."""
    from hydra.errors import InstantiationException

    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    names = {(c.__module__, c.__qualname__) for c in type(error).__mro__}
    if names & set(NAMED_ERRORS):
        return error
    if isinstance(error, CHECK_ERRORS) and _raised_in_package(error):
        return error
    return None


def _raised_in_package(error: BaseException) -> bool:
    """Whether ``error`` was raised by a ``raise`` statement of this package (the last frame
    of its traceback): its own check, not a library's failure passing through, nor Python's
    own TypeError or ValueError on a package line that is a bug (``None + 1``, a bad
    unpacking), which keeps its traceback."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename
    if PACKAGE not in Path(filename).resolve().parents:
        return False
    # a raise statement's frame line is the line of its `raise` keyword (Python 3.11)
    return re.search(r"(^|:)\s*raise\b", linecache.getline(filename, tb.tb_lineno).strip()) is not None


def one_message(error: BaseException) -> str:
    """What the user reads: the error's kind and its message."""
    return f"{type(error).__name__}: {str(error).strip()}"


@contextlib.contextmanager
def report_named_errors() -> Iterator[None]:
    """Around a script's work: a named error prints its message and a hint on stderr and
    exits with status 1; with ``HYDRA_FULL_ERROR=1`` it propagates with its traceback."""
    try:
        yield
    except Exception as error:
        named = named_error(error)
        if named is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(one_message(named), file=sys.stderr)
        print(HINT, file=sys.stderr, flush=True)
        raise SystemExit(1) from None
