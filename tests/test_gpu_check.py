"""``make gpu-check`` on a machine without a GPU, and its pieces on the CPU (``--device cpu --quick``).

Expected: without CUDA the script says so in one line and exits 0 (what ``make gpu-check`` does
here); with ``--device cpu`` every piece runs through the real code (the training loop, the
bench, resume) and passes: a CPU step equals itself (parity 0), a resumed run is bit-identical.
A piece that raises is a FAIL row, the others still run, and the exit status is 1.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from bpfree import gpu_check


def test_no_gpu_is_one_line_and_success():
    out = io.StringIO()
    assert gpu_check.main([], out=out) == 0
    assert out.getvalue().splitlines() == [
        "gpu-check: no GPU (torch.cuda.is_available() is False): nothing to check on this machine"]


def test_the_module_runs_as_make_gpu_check_runs_it():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run([sys.executable, "-m", "bpfree.gpu_check"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("gpu-check: no GPU")


def test_its_pieces_pass_on_the_cpu():
    out = io.StringIO()
    rc = gpu_check.main(["--device", "cpu", "--quick", "--only", "steps,parity,syncs,bench,resume,streams",
                         "--models", "mlp,transformer"], out=out)
    text = out.getvalue()
    assert rc == 0, text
    summary = text[text.rindex("| check | setting |"):].splitlines()[2:]  # the final table's rows
    rows = [l for l in summary if l.startswith("| ")]
    assert len(rows) == 2 * 2 * 3 + 3 + 3 + 2 + 1 + 3  # steps, parity, syncs (skipped), bench, resume, streams
    assert all("| ok |" in r or "skipped (CUDA only)" in r for r in rows), rows
    assert "| parity | mlp grape | ok |" in text and "difference 0.0e+00" in text
    assert "bit-identical" in text
    assert text.count("same .grad (0.0e+00)") == 2 * 3  # on the CPU the streams are the sequential step (line + table)
    assert text.count("| method | median ms/step") == 2  # the two bench tables


def test_a_failing_piece_is_reported_and_the_others_run(monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("grad differs\nsecond line")

    monkeypatch.setattr(gpu_check, "step_parity", broken)
    out = io.StringIO()
    rc = gpu_check.main(["--device", "cpu", "--quick", "--only", "parity,resume"], out=out)
    text = out.getvalue()
    assert rc == 1
    assert text.count("| FAIL |") == 3 and "RuntimeError: grad differs |" in text
    assert "| resume | mlp grape | ok |" in text


@pytest.mark.slow
def test_the_whole_quick_check_passes_on_the_cpu():
    # every model (vgg16, resnet20 too) and the two-process run (gloo here)
    out = io.StringIO()
    assert gpu_check.main(["--device", "cpu", "--quick"], out=out) == 0, out.getvalue()
    assert "| ddp | 2 processes | ok |" in out.getvalue()
    assert "| pipeline | 2 stages | ok |" in out.getvalue()
