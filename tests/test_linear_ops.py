"""The gated chunk ops' backend slot (minillm/attention/linear_backends.py): selection, errors,
every available backend equal to ``torch``, and the hand-written GLA intra-chunk backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minillm.attention import linear_backends, linear_ops
from minillm.attention.gla_intra import GLAIntraScores
from minillm.attention.linear_backends import ENV, backend_name, set_backend

CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _no_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    set_backend(None)
    yield
    set_backend(None)


def gla_inputs(t: int, bias: float = 3.0, device: str = "cpu", seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    b, h, dk, dv = 2, 3, 8, 16
    q, k = torch.randn(2, b, h, t, dk, generator=g) * dk**-0.5
    v = torch.randn(b, h, t, dv, generator=g)
    log_alpha = F.logsigmoid(torch.randn(b, h, t, dk, generator=g) + bias) / 4
    state = torch.randn(b, h, dk, dv, generator=g)
    return [x.to(device) for x in (q, k, v, log_alpha, state)]


def delta_inputs(t: int, gated: bool, device: str = "cpu", seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    b, h, dk, dv = 2, 3, 8, 16
    q, k = F.normalize(torch.randn(2, b, h, t, dk, generator=g), dim=-1)
    v = torch.randn(b, h, t, dv, generator=g)
    beta = torch.rand(b, h, t, generator=g)
    log_alpha = F.logsigmoid(torch.randn(b, h, t, generator=g) + 2) if gated else None
    state = torch.randn(b, h, dk, dv, generator=g) * 0.1
    xs = [q, k, v, beta, log_alpha, state]
    return [None if x is None else x.to(device) for x in xs]


def run_with_grads(op, inputs: list, chunk_size: int) -> list[torch.Tensor]:
    """Outputs, final state and the gradients of every tensor input under a fixed cotangent."""
    leaves = [None if x is None else x.clone().requires_grad_() for x in inputs]
    o, state = op(*leaves, chunk_size)
    weight = torch.randn(o.shape, generator=torch.Generator().manual_seed(7)).to(o.device)
    ((o.float() * weight).sum() + state.float().square().sum()).backward()
    return [o.detach().float(), state.detach().float()] + [
        x.grad.float() for x in leaves if x is not None
    ]


def assert_all_close(got: list, want: list, tol: float) -> None:
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, atol=tol * (1 + b.abs().max().item()), rtol=tol)


def test_auto_is_torch_on_cpu() -> None:
    assert backend_name(torch.device("cpu")) == "torch"


def test_environment_variable_and_set_backend_choose(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV, "compiled")
    assert backend_name(torch.device("cpu")) == "compiled"
    set_backend("torch")  # a programmatic choice wins over the environment
    assert backend_name(torch.device("cpu")) == "torch"


def test_unknown_backends_and_fla_on_cpu_are_clear_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="unknown linear backend 'triton'"):
        set_backend("triton")
    monkeypatch.setenv(ENV, "cuda")
    with pytest.raises(ValueError, match="MINILLM_LINEAR_BACKEND='cuda'"):
        backend_name(torch.device("cpu"))
    set_backend("fla")
    with pytest.raises(ValueError, match="needs CUDA tensors and `import fla`"):
        linear_backends.chunk_gla(*gla_inputs(8), 4)


@pytest.mark.parametrize("bias", [3.0, -30.0], ids=["mild", "strong_decay"])
def test_gla_intra_backward_is_exact(bias: float) -> None:
    """The hand-written backward against finite differences, also where exp(-g) overflows."""
    q, k, _, log_alpha, _ = (x.double() for x in gla_inputs(8, bias))
    g = log_alpha.reshape(2, 3, 2, 4, 8).cumsum(-2)  # two chunks of 4, cumulated per chunk
    leaves = [x.reshape(2, 3, 2, 4, 8)[:1, :1].clone().requires_grad_() for x in (q, k)]
    leaves.append(g[:1, :1].clone().requires_grad_())
    assert torch.autograd.gradcheck(GLAIntraScores.apply, leaves)


@pytest.mark.slow  # two CPU compiles, about 45 s
def test_compiled_backend_equals_torch() -> None:
    for op, inputs in (
        ("chunk_gla", gla_inputs(24)),
        ("chunk_delta_rule", delta_inputs(24, gated=True)),
    ):
        want = run_with_grads(getattr(linear_ops, op), inputs, 8)
        set_backend("compiled")
        got = run_with_grads(getattr(linear_backends, op), inputs, 8)
        set_backend(None)
        assert_all_close(got, want, 1e-4)


FLA = CUDA and linear_backends.fla_available()


@pytest.mark.gpu
@pytest.mark.skipif(not FLA, reason="needs a CUDA device and flash-linear-attention")
@pytest.mark.parametrize("op", ["gla", "delta_rule", "gated_delta_rule"])
def test_fla_backend_equals_torch(op: str) -> None:
    """fla's Triton kernels (tf32 matmuls inside) against the torch backend on the same GPU."""
    if op == "gla":
        inputs, name = gla_inputs(200, device="cuda"), "chunk_gla"
    else:
        inputs, name = delta_inputs(200, gated=op == "gated_delta_rule", device="cuda"), op
        name = "chunk_delta_rule"
    want = run_with_grads(getattr(linear_ops, name), inputs, 64)
    set_backend("fla")
    got = run_with_grads(getattr(linear_backends, name), inputs, 64)
    assert_all_close(got, want, 2e-2)
