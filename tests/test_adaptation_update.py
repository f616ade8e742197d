"""``apply_update``: the one parameter update after backward, in its fixed order."""

from __future__ import annotations

import torch

from gsa_core.adaptation import apply_update


class Recorder:
    """A controller stand-in that records its calls and the gradient it saw."""

    def __init__(self, log: list[str], param: torch.Tensor) -> None:
        self.log, self.param, self.seen = log, param, None

    def after_backward(self, step: int) -> None:
        self.log.append(f"after_backward({step})")
        self.seen = self.param.grad.clone()

    def step(self, step: int) -> str:
        self.log.append(f"controller.step({step})")
        return "refined"


class LoggedSGD(torch.optim.SGD):
    def __init__(self, params, log: list[str], **kw) -> None:
        super().__init__(params, **kw)
        self.log = log

    def step(self, closure=None):
        self.log.append("optimizer.step")
        return super().step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.log.append("zero_grad")
        super().zero_grad(set_to_none)


def setup(log: list[str]) -> tuple[torch.nn.Parameter, LoggedSGD]:
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    (p * torch.tensor([3.0, 4.0, 12.0], dtype=torch.float64)).sum().backward()  # grad [3, 4, 12], norm 13
    return p, LoggedSGD([p], log, lr=0.1)


def test_order_average_controller_step_refine_zero() -> None:
    log: list[str] = []
    p, opt = setup(log)
    controller = Recorder(log, p)

    def average() -> None:
        log.append("average")
        p.grad.mul_(0.5)  # what an all-reduce mean over two ranks with one zero gradient would give

    report = apply_update(opt, 7, controller=controller, average_gradients=average)
    assert log == ["average", "after_backward(7)", "optimizer.step", "controller.step(7)", "zero_grad"]
    assert torch.equal(controller.seen, torch.tensor([1.5, 2.0, 6.0], dtype=torch.float64))  # the averaged one
    assert report.refine == "refined" and report.grad_norm is None
    assert p.grad is None


def test_clipping_reports_the_norm_before_and_steps_with_the_clipped_gradient() -> None:
    log: list[str] = []
    p, opt = setup(log)
    start = p.detach().clone()
    grad = p.grad.clone()
    report = apply_update(opt, 0, max_grad_norm=1.0)
    assert report.grad_norm == 13.0
    coef = 1.0 / (13.0 + 1e-6)  # clip_grad_norm_'s factor
    # float64: the step is a few roundings of numbers of order 1
    torch.testing.assert_close(p.detach(), start - 0.1 * grad * coef, rtol=0, atol=8 * torch.finfo(torch.float64).eps)
    assert log == ["optimizer.step", "zero_grad"]


def test_without_controller_or_clipping_it_is_a_plain_step() -> None:
    log: list[str] = []
    p, opt = setup(log)
    start = p.detach().clone()
    report = apply_update(opt, 0)
    expected = start - 0.1 * torch.tensor([3.0, 4.0, 12.0], dtype=torch.float64)
    torch.testing.assert_close(p.detach(), expected, rtol=0, atol=8 * torch.finfo(torch.float64).eps)
    assert report.grad_norm is None and report.refine is None
