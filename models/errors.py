"""The errors of models/: a model file, a built MoE or a router config that cannot be used as asked.

models/ imports nothing outside itself, so its errors have their own base; `vorch_jax.errors.user_errors` lists it
among the errors the CLI prints as one line.
"""

from __future__ import annotations


class ModelError(Exception):
    """A model that cannot be loaded or built as asked; the message is one line saying what to do."""


class ModelFileError(ModelError, RuntimeError):
    """The model file is missing, unreadable, truncated or not the architecture we expect."""


class MoEError(ModelError, ValueError):
    """A partition, router set or stored MoE that does not fit the model it is used with."""


class CorpusError(ModelError, RuntimeError):
    """The evaluation text is not installed or not readable."""


class RouterConfigError(ModelError, ValueError):
    """A router-training config problem; the message is one line naming the file and key."""
