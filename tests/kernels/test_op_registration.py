"""``ops/registration.define_op``: an op defined with ``torch.library.Library`` behaves like a
``custom_op`` where it matters (schema from type hints, fake kernel, autograd formula, opcheck,
torch.compile), and with grad off it runs the body without recording a graph."""
from __future__ import annotations

import torch
from torch import Tensor

from chronicals_compile.ops.registration import define_op


def _scaled_square(x: Tensor, w: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    return x * x * w * scale, x.clone()


def _fake(x, w, scale):
    return torch.empty_like(x), torch.empty_like(x)


def _setup(ctx, inputs, output):
    x, w, scale = inputs
    ctx.scale = scale
    ctx.save_for_backward(x, w)


def _backward(ctx, grad, grad_copy):
    x, w = ctx.saved_tensors
    dx = grad * 2 * x * w * ctx.scale + (grad_copy if grad_copy is not None else 0)
    dw = grad * x * x * ctx.scale
    return dx if ctx.needs_input_grad[0] else None, dw if ctx.needs_input_grad[1] else None, None


OP = define_op("chronicals_test::scaled_square", _scaled_square, fake=_fake, backward=_backward,
               setup_context=_setup)
NO_GRAD_OP = define_op("chronicals_test::scaled_square_plain", _scaled_square, fake=_fake)


def test_schema_is_inferred_from_the_type_hints():
    assert str(OP._schema) == "chronicals_test::scaled_square(Tensor x, Tensor w, float scale) -> (Tensor, Tensor)"


def test_gradients_match_the_formula_and_gradcheck():
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: OP(a, b, 0.7), (x, w))
    y, copy = OP(x, w, 0.7)
    (y.sum() + copy.sum()).backward()
    torch.testing.assert_close(x.grad, 2 * x.detach() * w.detach() * 0.7 + 1)
    torch.testing.assert_close(w.grad, x.detach() ** 2 * 0.7)


def test_opcheck():
    x, w = torch.randn(4, 6, requires_grad=True), torch.randn(4, 6, requires_grad=True)
    torch.library.opcheck(OP, (x, w, 1.5))
    torch.library.opcheck(NO_GRAD_OP, (x.detach(), w.detach(), 1.5))


def test_no_grad_records_nothing():
    x, w = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    with torch.no_grad():
        y, _ = OP(x, w, 2.0)
    assert not y.requires_grad and y.grad_fn is None
    torch.testing.assert_close(y, x.detach() ** 2 * w.detach() * 2.0)


def test_compiles_with_its_backward():
    x = torch.randn(8, 4, requires_grad=True)
    w = torch.randn(8, 4, requires_grad=True)

    def f(a, b):
        y, c = OP(a, b, 0.5)
        return (y.sin() + c).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(x, w), (x, w))
    want = torch.autograd.grad(f(x, w), (x, w))
    for g, e in zip(got, want):
        torch.testing.assert_close(g, e)
