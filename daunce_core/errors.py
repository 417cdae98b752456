"""Errors and warnings that name what is wrong and how to fix it."""


class DaunceError(ValueError):
    """Bad input or an impossible request; the message names the problem and the fix."""


class TaskError(DaunceError):
    """A user `Task` broke the protocol (wrong shape, reduced loss, missing optional hook)."""


class DaunceWarning(UserWarning):
    """Something was left out or degraded (for example a diverged perturbed copy)."""
