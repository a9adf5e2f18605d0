"""Concurrent blocks on one GPU: each block's forward and backward on a CUDA stream of its own.

Once the output error ``e`` exists, a direct-feedback step's block updates are independent: block
``l`` needs only ``h_{l-1}`` (saved in its forward pass) and ``B_l e``. PyTorch's autograd runs each
backward operation on the stream its forward operation ran on, and synchronises a gradient that
crosses streams, so choosing a stream per block *in the forward pass* is enough for the blocks'
backward passes to run concurrently on the device: when the error tap hands ``e`` to every link,
block ``l``'s kernels queue on stream ``l`` and do not wait for block ``l + 1``'s.

:class:`BlockStreams` is the method's pool of streams (one per block, made once and reused);
:meth:`BlockStreams.forward` gives one forward pass its :class:`StreamPass`: the pass switches to the
next block's stream at every feedback point (that stream first waits for the current one, since the
block reads ``h_l``), returns to the caller's stream at the end of the forward pass (which waits for
the head's stream), and :meth:`StreamPass.join` makes the caller's stream wait for every block's
stream after the backward call, before the optimizer reads ``.grad``.

What it can gain: the backward passes of blocks too small to fill the GPU alone (small batches,
narrow layers, the Transformer's per-block work at short context) overlap, so a step's backward
time approaches the longest block's instead of the sum; the forward pass stays sequential (each
block needs the previous one's output). What it cannot: blocks that each fill the device already
run no faster together, and on the CPU there are no streams: the option is accepted and changes
nothing (the results are the sequential ones).
"""

from __future__ import annotations

from typing import Any

import torch


class _CudaStreams:
    """The stream calls of ``torch.cuda`` (replaceable in tests)."""

    @staticmethod
    def current(device: torch.device) -> Any:
        return torch.cuda.current_stream(device)

    @staticmethod
    def make(device: torch.device) -> Any:
        return torch.cuda.Stream(device)

    @staticmethod
    def use(stream: Any) -> None:
        torch.cuda.set_stream(stream)


class StreamPass:
    """The streams of one forward pass: ``next_block()`` at each point, ``end_forward()`` after the
    model, ``join()`` after the backward call."""

    def __init__(self, pool: "BlockStreams", device: torch.device) -> None:
        self.pool, self.device = pool, device
        self.used: list[Any] = []
        self.caller = pool.api.current(device)

    def next_block(self) -> None:
        """From here on the pass queues on the next block's stream (after the current one's work)."""
        api = self.pool.api
        stream = self.pool.stream(len(self.used), self.device)
        stream.wait_stream(api.current(self.device))
        api.use(stream)
        self.used.append(stream)

    def end_forward(self) -> None:
        """Back on the caller's stream, which waits for the last block's (the head's) forward work."""
        if self.used:
            api = self.pool.api
            self.caller.wait_stream(api.current(self.device))
            api.use(self.caller)

    def join(self) -> None:
        """The caller's stream waits for every block's stream (their backward work included)."""
        for stream in self.used:
            self.caller.wait_stream(stream)


class BlockStreams:
    """A method's pool of CUDA streams, one per block, made on first use and kept."""

    def __init__(self, api: Any = _CudaStreams) -> None:
        self.api = api
        self._pool: list[Any] = []

    def stream(self, index: int, device: torch.device) -> Any:
        while len(self._pool) <= index:
            self._pool.append(self.api.make(device))
        return self._pool[index]

    def forward(self, device: torch.device, enabled: bool) -> StreamPass | None:
        """The streams of one forward pass on ``device``; ``None`` (no streams, nothing to do)
        unless ``enabled`` and on CUDA."""
        return StreamPass(self, device) if enabled and device.type == "cuda" else None
