"""G prompt encoders, one per group, run as ONE batched computation: ``forward()`` -> table_MH.

Each group keeps its own ``PromptEncoder`` (its own parameter tensors: an optimizer step skips a
group whose gradients are None, so a group with no rows in a step keeps its weights and AdamW
state bit for bit, ``train/recipe.py``). The forward does not loop over those modules: groups
with the same slot count m are stacked (``torch.stack`` of their parameters, differentiable, a
copy of the encoder weights once per step) and run as one batch of g::

    embeds_GMH = stack(embedding.weight)                    (g, m, h)
    biLSTM, 2 layers: both directions of all g groups as one batch of 2g: one input GEMM per
      layer (baddbmm over all m steps), then m recurrent bmm's of (2g, 1, h/2) x (2g, h/2, 2h)
    MLP: two baddbmm's of (g, m, h) x (g, h, h)
    table_MH = cat over the buckets, in group order          (M = sum of m_g, h)

The LSTM is written out (PyTorch's gate order i, f, g, o; c' = f c + i g; h' = o tanh c') because
``torch.func.vmap`` has no batching rule for ``aten::lstm``: vmapping nn.LSTM would fall back to a
per-group loop. It equals G separate nn.LSTM encoders within float rounding (tested, forward and
gradients), and a group's output does not depend on which other groups are in the batch (tested
bit for bit on CPU: the test of one run over two groups against two single-group runs rests on it;
on CUDA cuBLAS may pick kernels by batch count, so there it holds within rounding).
Cost: the m-step recurrence is a Python loop of 2 x m small bmm's per layer, once per optimizer
step (not per micro-batch), for any G.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ptuning_dist.prompt.encoder import PromptEncoder
from ptuning_dist.prompt.groups import PromptGroups, group_seed


class PromptEncoders(nn.Module):
    """The encoders of a run's prompt groups; ``forward()`` -> the stacked table (M x h, fp32)."""

    def __init__(self, kind: str, groups: PromptGroups, hidden: int, lstm_dropout: float = 0.0, seed: int = 0):
        super().__init__()
        self.kind, self.groups, self.hidden = kind, groups, hidden
        self.n_prompt = groups.total
        self.lstm_dropout = lstm_dropout
        encs = []
        for name, m in zip(groups.names, groups.n_prompt):
            with torch.random.fork_rng(devices=[]):  # each group from its own seed (groups.group_seed)
                torch.manual_seed(group_seed(seed, name))
                encs.append(PromptEncoder(kind, m, hidden, lstm_dropout))
        self.encoders = nn.ModuleList(encs)
        buckets: dict[int, list[int]] = {}
        for g, m in enumerate(groups.n_prompt):
            buckets.setdefault(m, []).append(g)
        self.buckets = list(buckets.values())  # group indices sharing a slot count, in group order

    def group_parameters(self, g: int) -> list[nn.Parameter]:
        return list(self.encoders[g].parameters())

    def forward(self) -> torch.Tensor:
        parts: list[torch.Tensor | None] = [None] * len(self.encoders)
        for idx in self.buckets:
            encs = [self.encoders[g] for g in idx]
            x_GMH = torch.stack([e.embedding.weight for e in encs])
            if encs[0].lstm is not None:
                x_GMH = _bilstm(x_GMH, [e.lstm for e in encs], self.lstm_dropout if self.training else 0.0)
            if encs[0].mlp is not None:
                w1, b1, w2, b2 = (torch.stack([getattr(e.mlp[i], a) for e in encs]) for i, a in
                                  ((0, "weight"), (0, "bias"), (2, "weight"), (2, "bias")))
                x_GMH = torch.relu(_baddbmm(b1.unsqueeze(1), x_GMH, w1.transpose(1, 2)))
                x_GMH = _baddbmm(b2.unsqueeze(1), x_GMH, w2.transpose(1, 2))
            for j, g in enumerate(idx):
                parts[g] = x_GMH[j]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    @torch.no_grad()
    def export_table(self) -> torch.Tensor:
        """The stacked table these encoders produce now (fp32, detached, on CPU, no dropout)."""
        was_training = self.training
        self.eval()
        table_MH = self.forward().detach().float().cpu().clone()
        self.train(was_training)
        return table_MH


def _baddbmm(bias: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """baddbmm whose result for one batch element does not depend on the batch size: on CPU a batch
    of 1 takes the plain GEMM path and a batch of >= 2 the batched one, which round differently
    (seen with torch 2.13's CPU build). A lone group is computed as a batch of two copies, so a
    group's table is the same bits in a run of its own as among others (the LSTM's batches are 2g
    already). Costs one extra m x h x h product when there is one group."""
    if x.shape[0] > 1:
        return torch.baddbmm(bias, x, w)
    two = lambda t: t.expand(2, *t.shape[1:])  # noqa: E731
    return torch.baddbmm(two(bias), two(x), two(w))[:1]


def _bilstm(x_GMH: torch.Tensor, lstms: list[nn.LSTM], dropout: float) -> torch.Tensor:
    """g groups' 2-layer bidirectional LSTMs over their m slots: (g, m, h) -> (g, m, h)."""
    g = x_GMH.shape[0]
    for layer in range(2):
        if layer and dropout:
            x_GMH = F.dropout(x_GMH, dropout, training=True)
        sfx = [f"_l{layer}", f"_l{layer}_reverse"]  # forward direction, then backward
        w_ih = torch.stack([getattr(m, "weight_ih" + s) for s in sfx for m in lstms])  # (2g, 4u, h)
        w_hh = torch.stack([getattr(m, "weight_hh" + s) for s in sfx for m in lstms])  # (2g, 4u, u)
        bias = torch.stack([getattr(m, "bias_ih" + s) + getattr(m, "bias_hh" + s) for s in sfx for m in lstms])
        xs = torch.cat([x_GMH, x_GMH.flip(1)])  # the backward direction reads the slots right to left
        pre = torch.baddbmm(bias.unsqueeze(1), xs, w_ih.transpose(1, 2))  # (2g, m, 4u): every step's input
        u = w_hh.shape[2]
        h = pre.new_zeros((2 * g, 1, u))
        c = pre.new_zeros((2 * g, u))
        outs = []
        for t in range(pre.shape[1]):
            gates = pre[:, t] + torch.bmm(h, w_hh.transpose(1, 2)).squeeze(1)
            i, f, gg, o = gates.chunk(4, dim=-1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(gg)
            h_t = torch.sigmoid(o) * torch.tanh(c)
            outs.append(h_t)
            h = h_t.unsqueeze(1)
        out = torch.stack(outs, 1)  # (2g, m, u)
        x_GMH = torch.cat([out[:g], out[g:].flip(1)], dim=-1)
    return x_GMH
