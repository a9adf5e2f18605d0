"""Step time of data-parallel training with and without the run option ``overlap_reduction``.

``bpfree bench`` times one process; this script times ``bpfree train --nproc N`` itself. For each
repeat and method it trains the same run twice, ``--set overlap_reduction=false`` then ``=true``
(alternating, so drifts in machine load hit both alike), and takes the steady-state time per
step from ``metrics.jsonl``: the ``train_seconds`` of the last epoch line minus that of the first
(the first epoch holds the warm-up: cuDNN's benchmarking, the allocator, the first collectives),
divided by the steps in between. The loop's ``train_seconds`` waits for the device at each epoch
end, so on CUDA it covers the queued work. Printed: the median over repeats per method and
setting, and the ratio ``on / off`` (below 1: the overlap pays).

Example (two GPUs, one process each; NCCL needs a GPU per process)::

    python experiments/scripts/overlap_timing.py --nproc 2 --device cuda --methods bp,dfa \\
        --model resnet20 --dataset synthetic --set like=cifar10 --batch-size 256 --limit-train 25600 \\
        --epochs 3 --repeats 3 --out runs/overlap-timing

On the CPU (gloo), ``--device cpu`` (each process gets ``cores / N`` threads). Any other
``--set KEY=VALUE`` goes to every run. Runs are written under ``--out`` and replaced on the next call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path


def steady_step_seconds(run: Path) -> float:
    """Seconds per step after the first epoch, from the epoch lines of ``run/metrics.jsonl``."""
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [line for line in lines if line["kind"] == "epoch"]
    if len(epochs) < 2:
        raise SystemExit(f"{run}: need at least 2 epochs (the first is the warm-up), got {len(epochs)}")
    first, last = epochs[0], epochs[-1]
    return (last["train_seconds"] - first["train_seconds"]) / (last["step"] - first["step"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--device", default="cuda")
    p.add_argument("--methods", default="bp,dfa")
    p.add_argument("--model", default="resnet20")
    p.add_argument("--dataset", default="synthetic")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--limit-train", type=int, default=25600)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", type=Path, default=Path("runs/overlap-timing"))
    args = p.parse_args(argv)
    if args.epochs < 2:
        p.error("--epochs must be at least 2 (the first is the warm-up)")
    times: dict[tuple[str, bool], list[float]] = {}
    for k in range(args.repeats):
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            for overlap in (False, True):
                out = args.out / f"{method}-overlap-{str(overlap).lower()}-{k}"
                cmd = [sys.executable, "-m", "bpfree", "train", "--method", method, "--model", args.model,
                       "--dataset", args.dataset, "--device", args.device, "--batch-size", str(args.batch_size),
                       "--limit-train", str(args.limit_train), "--limit-test", "1000", "--epochs", str(args.epochs),
                       "--nproc", str(args.nproc), "--out", str(out), "--overwrite", "--no-progress",
                       "--set", f"overlap_reduction={str(overlap).lower()}", "--set", "log_every=1000000"]
                for item in args.set:
                    cmd += ["--set", item]
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                seconds = steady_step_seconds(out)
                times.setdefault((method, overlap), []).append(seconds)
                print(f"repeat {k + 1}/{args.repeats} {method} overlap_reduction={str(overlap).lower()}: "
                      f"{seconds * 1e3:.3f} ms/step", flush=True)
    print(f"\n{args.nproc} processes on {args.device}, {args.model} on {args.dataset}, global batch {args.batch_size}; "
          f"median over {args.repeats} repeats of the steady-state ms per step")
    print("| method | overlap off | overlap on | on / off |\n|---|---|---|---|")
    for method in dict.fromkeys(m for m, _ in times):
        off, on = statistics.median(times[method, False]), statistics.median(times[method, True])
        print(f"| {method} | {off * 1e3:.3f} | {on * 1e3:.3f} | {on / off:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
