"""Typed errors raised by surgery.

Every error a user can trigger with bad input is one of these. They subclass the
builtin a PyTorch user would expect (``ValueError`` / ``TypeError``), so existing
``except ValueError`` code keeps working, and their message names the problem and
the fix.
"""

__all__ = ["SurgeryError", "SurgeryTypeError", "PatternError", "HeadError", "NotSurgeredError", "AlreadySurgeredError"]


class SurgeryError(ValueError):
    """Base class: a bad argument or a model in the wrong state."""


class SurgeryTypeError(TypeError):
    """An argument of the wrong type (for example a model that is not an ``nn.Module``)."""


class PatternError(SurgeryError):
    """An ``include``/``exclude`` pattern that matches no module."""


class HeadError(SurgeryError):
    """No task head found, an ambiguous one, or a ``head=`` name that does not exist."""


class NotSurgeredError(SurgeryError):
    """``revert``/``describe`` on a model that has no surgery applied."""


class AlreadySurgeredError(SurgeryError):
    """``apply`` on a model that already carries surgery (revert it first)."""
