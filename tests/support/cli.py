"""What every command-line test asserts about a user's mistake: exit status 2, one `error:` line.

    from tests.support.cli import one_error_line
    line = one_error_line(CliRunner().invoke(cli, [...]), "s.zarr", "logits")   # needles the line must hold
"""

from __future__ import annotations

from typing import Any


def one_error_line(result: Any, *needles: str) -> str:
    """The single ``error:`` line of a click ``Result`` that exited with status 2 and no traceback."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]
