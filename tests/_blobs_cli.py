"""``python tests/_blobs_cli.py ARGS``: the bpfree CLI with the test-only ``blobs-test`` task registered.

For tests that run the CLI in a subprocess (SIGKILL and resume, ``--nproc``): the task lives in
``conftest.py``, which only pytest imports. Processes spawned by ``--nproc`` re-import this file as
their main module, so they register the task too.

With ``BPFREE_TEST_HOLD_AFTER=N`` in the environment, the process stops (sleeps) once it has
written the checkpoint ``N`` steps after its first one, so that a run a test means to kill cannot
end before the test gets to kill it, however slowly the test is scheduled.
"""

import os
import sys
import time

import conftest  # noqa: F401  (registers blobs-test)
from bpfree.cli import main


def hold_after(steps: int) -> None:
    from bpfree.train import rundir

    real = rundir.write_checkpoint
    first: list[int] = []

    def write_checkpoint(path, payload):
        real(path, payload)
        step = payload["state"]["global_step"]
        first[:] = first or [step]
        if step - first[0] >= steps:
            time.sleep(600)  # the test kills it here; an orphan ends on its own eventually

    rundir.write_checkpoint = write_checkpoint


if __name__ == "__main__":
    if os.environ.get("BPFREE_TEST_HOLD_AFTER"):
        hold_after(int(os.environ["BPFREE_TEST_HOLD_AFTER"]))
    sys.exit(main())
