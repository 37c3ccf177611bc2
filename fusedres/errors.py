"""The one exception class of fusedres's shape and size checks.

PyTorch raises RuntimeError for a wrong-sized batch-norm tensor (``running_mean should
contain 10 elements not 9``) and ValueError for a batch with one value per channel; the
project's rule is ValueError with a message naming the argument, the expected and the
actual value. ShapeError is both, so code written against either catches it.
"""
from __future__ import annotations

from typing import Optional


class ShapeError(ValueError, RuntimeError):
    """A tensor argument of the wrong shape or size.

    ``ShapeError(argument, expected, actual)`` reads "{argument} must {expected}, got
    {actual}"; ``message`` replaces that text where PyTorch's own words are kept."""

    def __init__(self, argument: str, expected: str, actual: str,
                 message: Optional[str] = None):
        super().__init__(message or f"{argument} must {expected}, got {actual}")
        self.argument, self.expected, self.actual = argument, expected, actual
