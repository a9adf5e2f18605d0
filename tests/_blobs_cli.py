"""``python tests/_blobs_cli.py ARGS``: the bpfree CLI with the test-only ``blobs-test`` task registered.

For tests that run the CLI in a subprocess (SIGKILL and resume, ``--nproc``): the task lives in
``conftest.py``, which only pytest imports. Processes spawned by ``--nproc`` re-import this file as
their main module, so they register the task too.
"""

import sys

import conftest  # noqa: F401  (registers blobs-test)
from bpfree.cli import main

if __name__ == "__main__":
    sys.exit(main())
