"""A causal decoder-only Transformer language model with feedback points per block.

Architecture (pre-norm, as in GPT-2)::

    x (batch, T) int64 token ids
    h_0 = Dropout(E[x] + P[:T])                                   (batch, T, d)   E: (V, d), P: (context, d)
    for each block l = 1..depth:
        a_l   = h_{l-1} + Dropout(Attn(LN_1(h_{l-1})))            residual add after causal self-attention
        f_l   = act(W_1 LN_2(a_l) + b_1)                          (batch, T, d_ff)
        h_l   = a_l + Dropout(W_2 f_l + b_2)                      residual add after the FFN
    z = h_depth                                                   <- bpfree.Head (error_at="hidden")
    y = LN_f(z) W_out^T                                           (batch, T, V) logits; W_out = E when tied

Pre-norm: every sub-layer reads a LayerNorm of the residual stream and adds its output back to the
unnormalised stream, and one final LayerNorm ``LN_f`` precedes the vocabulary projection. Every
block output ``h_l`` therefore lives in one space (the residual stream, width ``d``), which is also
the space of the error ``e`` below, so every ``J_l = dz/dh_l`` is square and close to the identity
plus the sum of the later blocks' residual branches.

Feedback points (``feedback`` option):

* ``macro``: one :class:`~bpfree.FeedbackPoint` per block, at ``h_l`` (Launay et al. 2020).
* ``micro``: three per block: at ``a_l`` (after the attention residual add), at ``f_l`` (after the
  FFN non-linearity, width ``d_ff``) and at ``h_l`` (after the FFN residual add).

Attention keeps ordinary backpropagation inside a block: under DFA the signal delivered at a
point flows back through everything between it and the previous point (attention, LayerNorms,
the FFN), never across a point.

Where the error is taken (``error_at`` option):

* ``hidden`` (default): a :class:`~bpfree.Head` marker sits on the residual stream *before the final
  LayerNorm*, so the model's head is ``LN_f`` + the vocabulary projection, ``e = dL/dz`` has shape
  ``(batch, T, d)`` (``o = d``) and every ``B_l`` is ``(n_l, d)``. This is Launay et al.'s
  "before the vocabulary projection", with the final LayerNorm counted as part of the head: ``e``
  is then the exact BP signal at the last block output (``J_depth = I`` in macro placement), and
  ``LN_f``'s per-token scaling stays inside the head, where it gets its true gradient.
* ``logits``: no Head; ``e = dL/dy`` is ``(batch, T, V)`` and ``B_l`` is ``(n_l, V)`` (costly for
  large vocabularies). ``LN_f`` and the projection are then the block after the last point and
  get their true gradients from ``e``.

In both cases ``B_l`` acts per token: the signal at token ``t`` is ``B_l e_t``.

Tied embeddings (``tied``, default on) under DFA: ``E`` serves twice, as the input embedding and
as the output projection ``W_out = E``. Its gradient is the sum of (1) the true gradient of the head,
``sum_t (softmax(y_t) - onehot_t) LN_f(z_t)^T`` (the head is backpropagated exactly from the loss),
and (2) for the rows of the input tokens, the DFA signal of the *first* block sent back through
that block to its input ``h_0`` (the embedding sits before the first point, so it belongs to block
1): ``dL~/dh_0 = (dh_1/dh_0)^T B_1 e`` (macro; ``a_1`` in micro), which for a pre-norm block is
``B_1 e`` plus the attention/FFN branch terms. Under BP term (2) would be ``J_0^T e``; under DFA it
is a random projection of the error, so the tied matrix receives an exact and a feedback-aligned
part that add up, just as the positional table ``P`` gets only the DFA part. ``tied=false`` keeps
the two roles in separate matrices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

from ..options import OptionError, option
from ..points import FeedbackPoint, Head
from . import register

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU}


@dataclass
class TransformerOptions:
    depth: int = option(2, "number of Transformer blocks")
    d_model: int = option(128, "width d of the residual stream (and of the error e with error_at=hidden)")
    heads: int = option(4, "attention heads (must divide d_model)")
    d_ff: int = option(0, "hidden width of the feed-forward sub-layer (0: 4 * d_model)")
    max_context: int = option(0, "number of learned positions (0: the input length, i.e. the dataset's context); longer inputs are refused")
    dropout: float = option(0.1, "dropout on embeddings, attention weights and both residual branches")
    tied: bool = option(True, "tie the output projection to the token embedding (W_out = E)")
    feedback: str = option("macro", "feedback points: macro = one per block output; micro = after attention add, FFN non-linearity and FFN add", choices=("macro", "micro"))
    error_at: str = option("hidden", "where e is taken: hidden = a bpfree.Head before the final LayerNorm (o = d_model); logits = the model output (o = vocabulary size)", choices=("hidden", "logits"))
    activation: str = option("gelu", "FFN non-linearity", choices=tuple(ACTIVATIONS))

    def check(self) -> None:
        for key in ("depth", "d_model", "heads"):
            if getattr(self, key) < 1:
                raise OptionError(f"option {key!r} must be at least 1, got {getattr(self, key)}")
        if self.d_model % self.heads:
            raise OptionError(f"option 'heads' ({self.heads}) must divide 'd_model' ({self.d_model})")
        if self.d_ff < 0 or self.max_context < 0:
            raise OptionError("options 'd_ff' and 'max_context' must not be negative (0 picks the default)")
        if not 0.0 <= self.dropout < 1.0:
            raise OptionError(f"option 'dropout' must lie in [0, 1), got {self.dropout}")


def _has_tangent(*ts: torch.Tensor) -> bool:
    """True when any of ``ts`` carries a forward-mode tangent (inside a ``dual_level``)."""
    return any(fwAD.unpack_dual(t).tangent is not None for t in ts)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: ``(batch, T, d) -> (batch, T, d)``.

    ``q, k, v = split(x W_qkv^T + b)`` into ``heads`` heads of width ``d / heads``;
    ``A = softmax(q k^T / sqrt(d/heads) + M)`` with ``M_ts = -inf`` for ``s > t`` (token ``t`` sees
    tokens ``s <= t`` only); output ``concat_heads(A v) W_o^T + b_o``. Uses
    ``F.scaled_dot_product_attention`` unless a forward-mode tangent is present (PyTorch has no
    forward AD for its fused CPU kernel); then the same formula is computed step by step.
    """

    def __init__(self, d_model: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        if _has_tangent(q, k, v):
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
            weights = F.dropout(scores.masked_fill(mask, float("-inf")).softmax(-1), p, self.training)
            o = weights @ v
        else:
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self.out(o.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """One pre-norm Transformer block ``h_{l-1} -> h_l`` on ``(batch, T, d)``, with its feedback points.

    ``a = h + Drop(Attn(LN_1(h)))`` -> ``attn_point``; ``f = act(W_1 LN_2(a) + b_1)`` -> ``act_point``;
    ``h_l = a + Drop(W_2 f + b_2)`` -> ``point``. In ``macro`` placement ``attn_point`` and
    ``act_point`` are identities (plain ``nn.Identity``) and only ``point`` is a FeedbackPoint.
    """

    def __init__(self, d_model: int, heads: int, d_ff: int, dropout: float, activation: str, micro: bool) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, heads, dropout)
        self.drop1 = nn.Dropout(dropout)
        self.attn_point = FeedbackPoint() if micro else nn.Identity()
        self.ln2 = nn.LayerNorm(d_model)
        self.fc1 = nn.Linear(d_model, d_ff)
        self.act = ACTIVATIONS[activation]()
        self.act_point = FeedbackPoint() if micro else nn.Identity()
        self.fc2 = nn.Linear(d_ff, d_model)
        self.drop2 = nn.Dropout(dropout)
        self.point = FeedbackPoint()

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = self.attn_point(h + self.drop1(self.attn(self.ln1(h))))
        f = self.act_point(self.act(self.fc1(self.ln2(a))))
        return self.point(a + self.drop2(self.fc2(f)))


class TransformerLM(nn.Module):
    """Causal decoder LM: token ids ``(batch, T)`` int64 -> logits ``(batch, T, V)``, ``T <= context``.

    See the module docstring for the formulas, the feedback points and the Head placement.
    Parameters are initialised GPT-2 style: ``N(0, 0.02^2)`` for embeddings and Linear weights,
    residual output projections (``attn.out``, ``fc2``) scaled by ``1 / sqrt(2 depth)``, zero biases.
    """

    def __init__(self, vocab: int, context: int, *, depth: int = 2, d_model: int = 128, heads: int = 4,
                 d_ff: int = 0, dropout: float = 0.1, tied: bool = True, feedback: str = "macro",
                 error_at: str = "hidden", activation: str = "gelu") -> None:
        super().__init__()
        if vocab < 1 or context < 1:
            raise ValueError(f"a language model needs a vocabulary and a context of at least 1, got {vocab} and {context}")
        if feedback not in ("macro", "micro") or error_at not in ("hidden", "logits"):
            raise ValueError(f"feedback must be macro or micro and error_at hidden or logits, got {feedback!r}, {error_at!r}")
        self.vocab, self.context = vocab, context
        self.feedback, self.error_at, self.tied = feedback, error_at, tied
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(context, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            Block(d_model, heads, d_ff or 4 * d_model, dropout, activation, feedback == "micro") for _ in range(depth)
        )
        self.head = Head() if error_at == "hidden" else nn.Identity()
        self.norm = nn.LayerNorm(d_model)
        self.proj = nn.Linear(d_model, vocab, bias=False)
        self._init(depth)
        if tied:
            self.proj.weight = self.embed.weight

    def _init(self, depth: int) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for blk in self.blocks:
            blk.attn.out.weight.data.mul_(1.0 / math.sqrt(2 * depth))
            blk.fc2.weight.data.mul_(1.0 / math.sqrt(2 * depth))

    def embed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """``E[x]``: ``(batch, T, d)``; ids outside ``[0, V)`` are a ``ValueError`` naming their range.

        The range is read only when the lookup fails (on the CPU it raises ``IndexError``), so a
        forward pass never waits for the device to report ``min``/``max`` of its input. On CUDA an
        id out of range trips a device-side assertion instead; the tasks check their token
        streams once, when they load.
        """
        try:
            return self.embed(x)
        except IndexError:
            lo, hi = int(x.min()), int(x.max())
            raise ValueError(f"token ids lie in [{lo}, {hi}], outside the vocabulary [0, {self.vocab})") from None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"the transformer takes token ids of shape (batch, T) and dtype int64, got shape "
                f"{tuple(x.shape)} and dtype {x.dtype}"
            )
        t = x.shape[1]
        if not 1 <= t <= self.context:
            raise ValueError(f"the transformer takes 1 to {self.context} tokens per sequence (its context), got {t}")
        h = self.drop(self.embed_tokens(x) + self.pos.weight[:t])
        for blk in self.blocks:
            h = blk(h)
        return self.proj(self.norm(self.head(h)))


@register("transformer", "causal pre-norm Transformer LM; feedback points per block (macro) or per sub-layer (micro)",
          TransformerOptions)
def build_transformer(input_shape: tuple[int, ...], num_classes: int, o: TransformerOptions) -> nn.Module:
    """``input_shape = (context,)`` (token ids per sequence), ``num_classes`` = vocabulary size ``V``."""
    if len(input_shape) != 1:
        raise ValueError(
            f"the transformer takes sequences of token ids, input_shape (context,), got {tuple(input_shape)}"
        )
    context = input_shape[0]
    if o.max_context and o.max_context < context:
        raise ValueError(f"option max_context={o.max_context} is shorter than the sequences ({context} tokens)")
    return TransformerLM(
        num_classes, o.max_context or context, depth=o.depth, d_model=o.d_model, heads=o.heads, d_ff=o.d_ff,
        dropout=o.dropout, tied=o.tied, feedback=o.feedback, error_at=o.error_at, activation=o.activation,
    )
