"""One line per exception, whatever its message."""

from __future__ import annotations

import pytest

from harness.errors import one_line


class WithMessage(Exception):
    def __init__(self, message: str) -> None:
        super().__init__("ignored")
        self.message = message


@pytest.mark.parametrize(
    ("exc", "line"),
    [
        (ValueError("bad value\nsecond line"), "ValueError: bad value"),
        (ValueError(""), "ValueError"),
        (KeyError(), "KeyError"),
        (RuntimeError("\n\n  "), "RuntimeError"),
        (OSError("  padded  "), "OSError: padded"),
        (WithMessage("from .message\nmore"), "WithMessage: from .message"),
    ],
)
def test_one_line(exc: BaseException, line: str) -> None:
    assert one_line(exc) == line


def test_without_type_and_bounded() -> None:
    assert one_line(ValueError("x" * 900), with_type=False, limit=10) == "x" * 10
    assert one_line(ValueError(""), with_type=False) == "ValueError"
