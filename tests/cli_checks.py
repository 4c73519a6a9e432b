"""The command line as the tests drive it: one invocation, and what a clean failure or success looks like."""
import re

from click.testing import CliRunner

import cli


def invoke(*args):
    return CliRunner().invoke(cli.cli, [str(a) for a in args])


def assert_error(res, *needles, code=None):
    """A clean failure: SystemExit (an uncaught exception would print a traceback), exit code != 0
    (or `code`), one `Error:` line, no traceback, and every needle (str or compiled regex) in the output."""
    out = res.output
    assert isinstance(res.exception, SystemExit), f"uncaught {res.exception!r}; output:\n{out}"
    assert res.exit_code != 0, out
    if code is not None:
        assert res.exit_code == code, out
    assert "Traceback" not in out, out
    assert sum(line.startswith("Error:") for line in out.splitlines()) == 1, out
    for needle in needles:
        found = needle.search(out) if isinstance(needle, re.Pattern) else needle in out
        assert found, f"{needle!r} not in:\n{out}"
    return out


def assert_ok(res):
    assert res.exit_code == 0 and res.exception is None, res.output
    return res.output
