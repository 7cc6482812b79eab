"""Mixture-of-experts feed-forward: a top-k router over SwiGLU experts, dropless.

Dropless, not capacity-limited: tokens are sorted by expert and each expert multiplies its
own contiguous slice (``torch.split`` + one matmul chain per expert), so no token is ever
dropped and no padding to a capacity is computed. On CPU this is the simplest fast form
(a capacity buffer would spend FLOPs on padding and need dropped-token bookkeeping);
``dropped`` is therefore always 0. The slow twin (a loop over tokens and their chosen
experts) is in ``tests/test_moe.py``.

Routing: softmax over all experts; the ``top_k`` largest probabilities weight their experts'
outputs divided by their sum (``renormalize``, the default, as Mixtral: the output keeps the
dense scale; measured 6 % lower perplexity than raw weights, see README), or as they are
(``renormalize=false``, OLMoE). With ``top_k=1`` the raw probability is always kept (Switch): a
weight of 1 would leave the router to the aux loss alone. An optional shared expert sees
every token with weight 1.

Auxiliary losses, recomputed at every forward and kept on the module for the training loss
(``aux_loss``: already weighted) and for logging (``balance_loss``, ``z_loss``, ``load``):

- load balancing (Switch, Fedus et al. 2021): ``n_experts * sum_e f_e * p_e`` with ``f_e`` the
  fraction of routed (token, slot) pairs sent to expert e and ``p_e`` its mean router
  probability; 1 when balanced, ``n_experts`` when one expert takes everything;
- router z-loss (ST-MoE, Zoph et al. 2022): mean squared logsumexp of the router logits,
  which keeps the logits small.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minillm import checks


def init_gated(mlp: nn.Module, std: float, out_std: float) -> None:
    """SwiGLU's weights, for ``SwiGLU`` and the stacked experts here (same names): gate and up
    N(0, std), down N(0, out_std)."""
    nn.init.normal_(mlp.gate_proj.weight, 0.0, std)
    nn.init.normal_(mlp.up_proj.weight, 0.0, std)
    nn.init.normal_(mlp.down_proj.weight, 0.0, out_std)


class ExpertLinear(nn.Module):
    """``n`` stacked bias-free linear maps: ``weight`` (n, out, in); expert e is ``weight[e]``."""

    def __init__(self, n: int, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n, out_features, in_features))
        nn.init.normal_(self.weight, 0.0, 0.02)  # init_block_weights sets the model's std


class MoEMLP(nn.Module):
    """Top-k mixture of SwiGLU experts; expert ``n_experts`` (the last) is the shared one."""

    @dataclass
    class Config:
        n_experts: int = 8
        top_k: int = 2
        # None: hidden // (top_k + shared_expert), so a token's active feed-forward
        # parameters equal the dense SwiGLU's of width ``model.mlp_hidden``
        expert_hidden: int | None = None
        shared_expert: bool = False
        renormalize: bool = True  # top-k weights divided by their sum if top_k > 1
        aux_loss_weight: float = 0.01  # Switch's alpha
        z_loss_weight: float = 0.001  # ST-MoE's

        def __post_init__(self) -> None:
            checks.integer("model.mlp.n_experts", self.n_experts)
            checks.integer("model.mlp.top_k", self.top_k)
            if self.top_k > self.n_experts:
                raise ValueError(
                    f"model.mlp.top_k={self.top_k}: must be at most model.mlp.n_experts="
                    f"{self.n_experts}"
                )
            checks.integer("model.mlp.expert_hidden", self.expert_hidden, optional=True)
            checks.choice("model.mlp.shared_expert", self.shared_expert, (False, True))
            checks.choice("model.mlp.renormalize", self.renormalize, (False, True))
            checks.number("model.mlp.aux_loss_weight", self.aux_loss_weight, 0)
            checks.number("model.mlp.z_loss_weight", self.z_loss_weight, 0)

    def __init__(self, config: Config, dim: int, hidden: int) -> None:
        super().__init__()
        self.config = config
        n_active = config.top_k + int(config.shared_expert)
        self.expert_hidden = config.expert_hidden or max(1, hidden // n_active)
        n_weights = config.n_experts + int(config.shared_expert)
        self.router = nn.Linear(dim, config.n_experts, bias=False)
        self.gate_proj = ExpertLinear(n_weights, dim, self.expert_hidden)
        self.up_proj = ExpertLinear(n_weights, dim, self.expert_hidden)
        self.down_proj = ExpertLinear(n_weights, self.expert_hidden, dim)
        self.aux_loss = torch.zeros(())  # weighted balance + z loss of the latest forward
        self.balance_loss = torch.zeros(())
        self.z_loss = torch.zeros(())
        self.load = torch.zeros(config.n_experts)  # fraction of routed slots per expert
        self.dropped = 0.0  # dropless: always 0

    def init_weights(self, std: float, out_std: float) -> None:
        """As SwiGLU's (every expert, the shared one too): gate and up N(0, std), down
        N(0, out_std); the router keeps nn.Linear's default, so routing starts near uniform
        without starting exactly uniform."""
        init_gated(self, std, out_std)

    def expert(self, e: int, x: Tensor) -> Tensor:
        """Expert ``e`` (SwiGLU) on x (N, dim) -> (N, dim)."""
        gate, up = x @ self.gate_proj.weight[e].T, x @ self.up_proj.weight[e].T  # (N, H)
        return (F.silu(gate) * up) @ self.down_proj.weight[e].T  # (N, dim)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (N, dim) -> router logits (N, E) fp32, top-k weights (N, k), top-k experts (N, k)."""
        logits = self.router(x).float()  # (N, E)
        weights, experts = logits.softmax(-1).topk(self.config.top_k, dim=-1)  # (N, k)
        if self.config.renormalize and self.config.top_k > 1:
            weights = weights / weights.sum(-1, keepdim=True)
        return logits, weights, experts

    def forward(self, x: Tensor) -> Tensor:
        """x (..., dim) -> (..., dim); sets ``aux_loss``, ``balance_loss``, ``z_loss``, ``load``."""
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, dim)
        logits, weights, experts = self.route(x)
        self._aux(logits, experts)
        k, flat = self.config.top_k, experts.flatten()  # (N * k,) slot -> expert
        order = flat.argsort(stable=True)  # slots grouped by expert
        token = order // k  # (N * k,) token of each sorted slot
        counts = flat.bincount(minlength=self.config.n_experts).tolist()
        pieces = x[token].split(counts)  # per expert (n_e, dim)
        out = torch.cat([self.expert(e, h) for e, h in enumerate(pieces)])  # (N * k, dim)
        out = out * weights.flatten()[order, None].to(out.dtype)
        y = out.new_zeros(x.shape).index_add_(0, token, out)  # (N, dim); autocast: out's dtype
        if self.config.shared_expert:
            y = y + self.expert(self.config.n_experts, x)
        return y.reshape(shape)

    def _aux(self, logits: Tensor, experts: Tensor) -> None:
        """Switch load-balancing loss, router z-loss and per-expert load from one routing."""
        n_experts = self.config.n_experts
        counts = experts.flatten().bincount(minlength=n_experts)  # (E,)
        load = counts.float() / experts.numel()  # f_e, (E,)
        mean_prob = logits.softmax(-1).mean(0)  # p_e, (E,)
        self.balance_loss = n_experts * (load * mean_prob).sum()
        self.z_loss = logits.logsumexp(-1).square().mean()
        self.aux_loss = (
            self.config.aux_loss_weight * self.balance_loss
            + self.config.z_loss_weight * self.z_loss
        )
        self.load = load.detach()

    def flops_per_token(self) -> float:
        """Forward FLOPs per token of the active parameters: router + top_k (+ shared) experts."""
        dim = self.router.in_features
        active = self.config.top_k + int(self.config.shared_expert)
        return 2.0 * dim * self.config.n_experts + active * 3 * 2.0 * dim * self.expert_hidden
