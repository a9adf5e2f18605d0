"""``parallel=streams``: each block's forward (hence backward) on its own CUDA stream.

Expected behaviour, from what the option is meant to do (bpfree.streams):

* on the CPU there are no streams: a step with ``parallel=streams`` fills exactly the ``.grad``
  and ``B_l`` of the sequential step (bit for bit);
* with a recording stand-in for ``torch.cuda``'s stream calls, block 0 runs on the caller's stream
  and block ``l`` (after point ``l``) on stream ``l - 1`` of the pool, the head on the last one;
  each stream first waits for the one before it (it reads ``h_l``), the caller's stream waits for
  the head's at the end of the forward pass and for every block's stream after the backward call,
  and the pool's streams are made once and reused by the next step.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bpfree import methods, models
from bpfree.streams import BlockStreams, StreamPass


def build(method, **options):
    torch.manual_seed(0)
    model = models.create("mlp", (8,), 4, widths=(16, 12, 8), activation="tanh")
    return model, methods.create(method, model, **options)


@pytest.mark.parametrize("method", ["dfa", "grape", "drtp", "dkp"])
def test_streams_change_nothing_on_the_cpu(method):
    x, y = torch.randn(10, 8), torch.randint(0, 4, (10,))
    assert BlockStreams().forward(torch.device("cpu"), True) is None  # no streams, nothing made per step
    results = []
    for parallel in ("none", "streams"):
        model, m = build(method, parallel=parallel)
        for _ in range(3):
            model.zero_grad()
            m.step(x, y, nn.functional.cross_entropy)
        results.append(([p.grad.clone() for p in model.parameters()], dict(m.state.feedback)))
    for a, b in zip(results[0][0], results[1][0]):
        assert torch.equal(a, b)
    for k in results[0][1]:
        assert torch.equal(results[0][1][k], results[1][1][k])


class FakeStream:
    def __init__(self, name, log):
        self.name, self.log = name, log

    def wait_stream(self, other):
        self.log.append(("wait", self.name, other.name))


class FakeApi:
    """Records the stream calls; ``current`` is whatever ``use`` set last."""

    def __init__(self):
        self.log, self.made = [], 0
        self.now = FakeStream("caller", self.log)

    def current(self, device):
        return self.now

    def make(self, device):
        self.made += 1
        return FakeStream(f"s{self.made - 1}", self.log)

    def use(self, stream):
        self.now = stream


class ActiveStreams(BlockStreams):
    """A pool that is active on any device (the stand-in plays CUDA)."""

    def forward(self, device, enabled):
        return StreamPass(self, device) if enabled else None


def test_each_block_queues_on_its_own_stream_and_the_caller_joins_them_all():
    model, m = build("dfa", parallel="streams")
    api = FakeApi()
    m.block_streams = ActiveStreams(api)
    linears = [mod for mod in model.modules() if isinstance(mod, nn.Linear)]
    ran_on = []
    for i, lin in enumerate(linears):
        lin.register_forward_pre_hook(lambda mod, inp, i=i: ran_on.append((i, api.now.name)))
    x, y = torch.randn(6, 8), torch.randint(0, 4, (6,))
    for step in range(2):
        ran_on.clear()
        api.log.clear()
        m.step(x, y, nn.functional.cross_entropy)
        # three points: block 0 on the caller's stream, blocks 1, 2 and the head on s0, s1, s2
        assert ran_on == [(0, "caller"), (1, "s0"), (2, "s1"), (3, "s2")]
        assert api.now.name == "caller"  # the loss and the optimizer run on the caller's stream
        assert api.log == [("wait", "s0", "caller"), ("wait", "s1", "s0"), ("wait", "s2", "s1"),
                           ("wait", "caller", "s2"),  # end of the forward pass
                           ("wait", "caller", "s0"), ("wait", "caller", "s1"), ("wait", "caller", "s2")]
    assert api.made == 3  # made once, reused by the second step
