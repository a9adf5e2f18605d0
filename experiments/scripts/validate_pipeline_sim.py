"""The pipeline simulator's 2-stage prediction against a measured 2-stage pipeline.

Reads the JSON of ``bpfree bench ... --pipeline 2 --json`` (which records how many feedback points
each stage held and the micro-batch count), measures the model's per-block costs on one
micro-batch of that size with the bench's optimizer (``bpfree.experiment.pipeline.measure``, one
thread: the bench's processes had one thread each), puts the blocks on the same two stages, and
prints the simulator's step times of BP 1F1B and of the DFA pipeline, its ratio ``T_bp / T_dfa``
and the measured one::

    bpfree bench --model mlp --set widths=1024,1024,1024,1024,1024,1024,1024,1024 --set activation=tanh \\
        --batch-size 128 --pipeline 2 --threads 1 --repeats 30 --methods bp,dfa --json > mlp.json
    python experiments/scripts/validate_pipeline_sim.py mlp.json --model mlp \\
        --set widths=1024,1024,1024,1024,1024,1024,1024,1024 --set activation=tanh --batch-size 128

Message latency: ``--latency-ms`` (default 0; a gloo ping-pong on one machine is about 0.1-0.2 ms).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bpfree import models
from bpfree.bench import load_task
from bpfree.experiment.pipeline import block_cost, measure
from bpfree.experiment.pipeline_sim import StageCost, predict, stage_costs
from bpfree.train.config import resolve
from bpfree.train.setup import make_optimizer


def whole_stages(model, points: list[int], x, y, loss_fn, repeats: int) -> list[tuple[float, float, float]]:
    """``(F, B, D)`` ms per stage, each stage timed as a whole on the micro-batch ``(x, y)``: F its
    forward; B BP's backward (the input gradient too, except on stage 0; the loss on the last);
    D DFA's: the forward cut at the stage's points and one backward call from signals at them
    (the loss and the head's gradient on the last stage); medians over ``repeats``."""
    from bpfree import methods
    from bpfree.pipeline import Split

    dfa = methods.create("dfa", model)
    children = list(model.named_children())
    cut = next(i for i, (n, _) in enumerate(children) if n == dfa.points[points[0] - 1][0])
    bounds = [(0, cut + 1), (cut + 1, len(children))]
    stages = [Split(bounds, [], {}, [], (), []).stage_module(model, s) for s in range(2)]
    with torch.no_grad():
        inputs = [x, stages[0](x)]

    def clock(fn) -> float:
        times = []
        for _ in range(3 + repeats):
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return statistics.median(times[3:]) * 1e3

    out = []
    for s, stage in enumerate(stages):
        last = s == 1
        # the signals are drawn once, outside the clock
        signals = {name: torch.randn_like(h) for name, h in dfa.forward_cut(inputs[s], module=stage,
                                                                             tapped=False).points.items()}

        def forward():
            return stage(inputs[s].detach().requires_grad_(s > 0))

        def bp():
            h = forward()
            (loss_fn(h, y) if last else h.sum()).backward()

        def dfa_step():
            record = dfa.forward_cut(inputs[s], module=stage, tapped=False)
            extra = [(loss_fn(record.output, y), torch.ones(()))] if last else []
            dfa.backward_signals(record, signals, extra)

        f = clock(forward)
        out.append((f, clock(bp) - f, clock(dfa_step) - f))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("bench_json")
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--optimizer", default="adam")
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--latency-ms", type=float, default=0.0)
    p.add_argument("--stage-costs", action="store_true",
                   help="time each stage as a whole (one forward, one backward call) instead of summing the "
                        "blocks' separately timed costs (which count one autograd call's overhead per block)")
    args = p.parse_args()
    rows = {r["method"]: r for r in json.load(open(args.bench_json))}
    points, M = rows["bp"]["stage_points"], rows["bp"]["microbatches"]
    cfg = resolve({"run": {"model": args.model, "dataset": args.dataset, "batch_size": args.batch_size,
                           "optimizer": args.optimizer, "device": "cpu"}}, args.set)
    torch.set_num_threads(1)
    task = load_task(cfg, torch.device("cpu"))
    torch.manual_seed(cfg.run.seed)
    model = models.create(cfg.run.model, task.input_shape, task.num_classes, **cfg.model)
    x, y = task.train_batch(0, 0, 0, cfg.run.batch_size)
    micro = -(-x.shape[0] // M)
    g = torch.Generator().manual_seed(0)
    costs = measure(model, x[:micro], y[:micro], task.loss_fn, args.repeats, 3, g,
                    optimizer=lambda params: make_optimizer(cfg.run, params))
    blocks = [block_cost(b) for b in costs["blocks"]]
    bounds = [(0, points[0]), (points[0], len(blocks))]
    stages = stage_costs(blocks, bounds, block_cost(costs["head"]))
    if args.stage_costs:
        updates = [c.update for c in stages]
        stages = [StageCost(*c, update=u) for c, u in zip(whole_stages(model, points, x[:micro], y[:micro],
                                                                      task.loss_fn, args.repeats), updates)]
    res = predict(stages, M, args.latency_ms, ("1f1b", "dfa"))
    predicted = res["1f1b"].total / res["dfa"].total
    measured = rows["bp"]["median_ms"] / rows["dfa"]["median_ms"]
    print(f"{args.model}: blocks {bounds}, micro-batches {M} of {micro}")
    for s, c in enumerate(stages):
        print(f"  stage {s}: F {c.forward:.2f} B {c.backward:.2f} D {c.dfa_backward:.2f} update {c.update:.2f} ms")
    print(f"  predicted ms/step: bp 1f1b {res['1f1b'].total:.1f}, dfa {res['dfa'].total:.1f}  ->  T_bp/T_dfa {predicted:.3f}")
    print(f"  measured  ms/step: bp 1f1b {rows['bp']['median_ms']:.1f}, dfa {rows['dfa']['median_ms']:.1f}  ->  "
          f"T_bp/T_dfa {measured:.3f}  (prediction {100 * (predicted / measured - 1):+.1f}%)")


if __name__ == "__main__":
    main()
