"""The bpfree CLI run in this process, for tests: exit code, stdout, stderr; and the one-line error check."""

from __future__ import annotations

import contextlib
import io

from bpfree import cli


def run_cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main([str(a) for a in argv])
        except SystemExit as exit:  # argparse
            rc = exit.code
    return rc, out.getvalue(), err.getvalue()


def assert_one_line_error(rc, err, *words):
    """Exit code 2 and one line ``bpfree: error: ...`` holding every one of ``words``."""
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bpfree: error: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in err, err
