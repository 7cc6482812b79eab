"""LM head + cross-entropy fused, by row chunks: the logits are never held whole.

``linear_cross_entropy(h, w, labels)`` equals ``F.cross_entropy(F.linear(h, w).float(), labels,
reduction="sum", ...)`` (its slow twin, in the tests) but computes the gradients during the
forward pass, one chunk of rows at a time: logits -> log-sum-exp -> softmax minus the one-hot
in place -> grad_h rows and a grad_w accumulation, while the chunk is in cache. Backward only
scales the stored gradients. Saves the (N, V) log-softmax, its slow CPU backward and the
zero-filled NLL gradient; memory holds grad_h (N, D) and grad_w (V, D) instead of (N, V).
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK_ELEMENTS = {"cpu": 1 << 21, "cuda": 1 << 26}  # logits per chunk: ~L3 on CPU; big on GPU
MIN_CHUNK_ROWS = 256


def linear_cross_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    chunk_rows: int | None = None,
) -> Tensor:
    """Summed token loss of logits ``hidden @ weight.T``: hidden (N, D), weight (V, D), labels (N,).

    Labels equal to ``ignore_index`` add nothing. Logits and softmax are fp32; the two
    matmuls run in the autocast dtype when autocast is on (as ``F.linear`` would).
    """
    device = hidden.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    if chunk_rows is None:
        # >= 256 rows: each chunk re-reads and re-writes the (V, D) weight gradient, so tiny
        # chunks (41 rows at V = 50257 on CPU) made the fused loss slower than plain CE
        chunk_rows = max(MIN_CHUNK_ROWS, CHUNK_ELEMENTS.get(device, 1 << 21) // weight.shape[0])
    grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    args = (labels, ignore_index, label_smoothing, chunk_rows, dtype or hidden.dtype, grad)
    with torch.autocast(device, enabled=False):
        return _LinearCrossEntropy.apply(hidden, weight, *args)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        ignore_index: int,
        smoothing: float,
        chunk_rows: int,
        dtype: torch.dtype,
        grad: bool,
    ) -> Tensor:
        h, w = hidden.to(dtype), weight.to(dtype)
        valid = labels != ignore_index
        target = torch.where(valid, labels, 0)[:, None]  # (N, 1)
        grad_h = torch.empty_like(hidden) if grad else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if grad else None
        loss = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, h.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            logits = (h[rows] @ w.T).float()  # (n, V)
            lse = torch.logsumexp(logits, -1)  # (n,)
            nll = lse - logits.gather(1, target[rows]).squeeze(1)
            if smoothing:
                nll = (1 - smoothing) * nll + smoothing * (lse - logits.mean(-1))
            loss += (nll * valid[rows]).sum()
            if grad:  # d(loss)/d(logits) = softmax - (1 - s) one_hot - s / V, 0 if ignored
                p = logits.sub_(lse[:, None]).exp_()  # (n, V) in place
                p.scatter_add_(1, target[rows], p.new_full(target[rows].shape, smoothing - 1))
                if smoothing:
                    p.sub_(smoothing / p.shape[1])
                p = p.mul_(valid[rows, None]).to(dtype)
                grad_h[rows] = p @ w  # (n, D)
                if dtype == torch.float32:
                    grad_w.addmm_(p.T, h[rows])  # (V, D)
                else:
                    grad_w += p.T @ h[rows]
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return loss

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_loss: Tensor) -> tuple:
        grad_h, grad_w = ctx.saved_tensors
        if grad_h is None:
            raise RuntimeError("linear_cross_entropy ran without gradients; call it with grad on")
        # scaled in place: a copy of grad_w (V, D) was the step's memory peak. The graph runs
        # backward once (no retain_graph in training), so the stored gradients are not reused.
        grad_h.mul_(grad_loss)
        return grad_h, grad_w.mul_(grad_loss).to(ctx.weight_dtype), *[None] * 6
