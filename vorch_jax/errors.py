"""Every error a user can cause, in one module low in the house: the CLI prints any of them as one line, exit 2.

`VorchError` is the base of the errors raised in vorch_jax/; the other rooms keep their own bases (models/ and tiers/
import nothing from here), and `user_errors()` is the one list of what counts as the user's problem rather than a
bug. A message is one line: what is wrong, and what to do about it.
"""

from __future__ import annotations


class VorchError(Exception):
    """A problem with what the user asked for (a config, a file, a budget, an output folder)."""

    def __init__(self, message: str = "", *args):
        super().__init__(" ".join(str(message).split()), *args)  # one line, always


class ConfigError(VorchError, ValueError):
    """Any problem with a run configuration. The message is one line, fit to print without a traceback.

    `key` is the dotted key at fault when there is one (``"score.w1"``, ``"placement[2].state"``); `detail` is the
    message without its location, used when an error is re-raised with the file or override that caused it.
    """

    def __init__(self, message: str, *, key: str | None = None, detail: str | None = None):
        super().__init__(message)
        self.key = key
        self.detail = detail


class RunError(VorchError, ValueError):
    """A run that cannot start as configured (reported before any work)."""


class BudgetError(VorchError, ValueError):
    """The budget cannot hold what must be on the device at once."""


class ProfileError(VorchError, ValueError):
    """A hardware profile that is missing, malformed, or has a missing / unknown / non-positive field."""


class RoutingTraceError(VorchError, ValueError):
    """A routing trace that is missing, unreadable, or does not fit the model or the run."""


class RecordMismatchError(VorchError, ValueError):
    """A stored record does not describe what the caller expects (other model, other shapes, other blocks)."""


class ReportError(VorchError, ValueError):
    """A folder that `vorch report` cannot report: no run, a damaged file, an unreadable config."""


class OutputError(VorchError, OSError):
    """An output folder that cannot be created or written (permissions, a full disk)."""


class QualityError(VorchError, ValueError):
    """A lossy run whose quality cannot be guarded: no measured sensitivity, or a quality budget it cannot keep."""


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types the CLI reports as one line (exit 2) instead of a traceback."""
    from vorch_jax.models.errors import ModelError
    from vorch_jax.tiers.nvme_store import CorruptBlockError

    return (VorchError, ModelError, CorruptBlockError)
