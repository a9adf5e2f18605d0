"""The non-finite watch: a NaN or inf loss stops the run, naming its step, before it is checkpointed."""

from __future__ import annotations

from pathlib import Path

import torch

from ..distributed import Workers
from .errors import TrainingError


class FiniteWatch:
    """Watches the loss of every step on the device (no synchronisation) and checks it when asked.

    :meth:`track` remembers the first step whose loss was not finite; :meth:`check` (before every
    log line and every checkpoint, on every rank together) stops the run if any rank saw one;
    :meth:`check_weights` (before every checkpoint) stops it if a weight is not finite, so the
    checkpoint left in ``out`` is always the last good one.
    """

    def __init__(self, workers: Workers, out: Path, batches_per_epoch: int) -> None:
        self.workers, self.out, self.batches_per_epoch = workers, Path(out), max(batches_per_epoch, 1)
        self._bad_step: torch.Tensor | None = None
        self._bad_loss: torch.Tensor | None = None

    def track(self, loss: torch.Tensor, step: int) -> None:
        """Remember (on the device, no synchronisation) the first step whose loss was not finite."""
        loss = loss.detach().float().reshape(-1)[:1].reshape(())
        if self._bad_step is None:
            self._bad_step = torch.zeros((), dtype=torch.float64, device=loss.device)
            self._bad_loss = torch.zeros((), dtype=torch.float64, device=loss.device)
        first = ~torch.isfinite(loss) & (self._bad_step == 0)
        self._bad_step.masked_fill_(first, float(step))
        self._bad_loss.copy_(torch.where(first, loss.double(), self._bad_loss))

    def check(self) -> None:
        """Stop (on every rank) if any rank saw a non-finite loss."""
        if self._bad_step is None:
            return
        rows = self.workers.gather_tensor(torch.stack([self._bad_step, self._bad_loss]))
        bad = sorted((int(step), loss) for step, loss in torch.stack(rows).tolist() if step > 0)  # one copy
        if bad:
            step, value = bad[0]
            kept = (f"The last good checkpoint is kept in {self.out}" if (self.out / "checkpoint.pt").exists()
                    else f"No checkpoint had been written to {self.out} yet")
            raise TrainingError(
                f"the loss became {value} at step {step} (epoch {(step - 1) // self.batches_per_epoch + 1}); "
                f"stopping. {kept}"
            )

    def check_weights(self, model: torch.nn.Module, step: int) -> None:
        """Stop if a weight of ``model`` is not finite (by step ``step``)."""
        params = [p.detach() for p in model.parameters()]
        if params and not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
            raise TrainingError(
                f"the weights became non-finite by step {step}; stopping without writing "
                f"a checkpoint. The last good checkpoint is kept in {self.out}"
            )
