"""Loss functions against values worked by hand and known identities."""

import math

import pytest
import torch
from torch.testing import assert_close

from dpo_sweep.losses import LOSSES, METRIC_NAMES, hinge_loss, ipo_loss, reward_metrics, robust_loss, sigmoid_loss

LN2 = math.log(2)


def logps(*values):
    return torch.tensor(values, dtype=torch.float32)


def test_sigmoid_by_hand():
    # policy chosen -1, rejected -3; reference chosen -2, rejected -2: h = (-1 + 3) - (-2 + 2) = 2.
    # beta 0.5: loss = -log sigmoid(1) = log(1 + e^-1) = 0.31326..., rewards 0.5 and -0.5.
    losses, chosen, rejected = sigmoid_loss(logps(-1.0), logps(-3.0), logps(-2.0), logps(-2.0), beta=0.5)
    assert_close(losses, logps(math.log1p(math.exp(-1))))
    assert_close(chosen, logps(0.5))
    assert_close(rejected, logps(-0.5))


def test_cdpo_by_hand():
    # h = 2, beta 0.5, eps 0.25: 0.75 * log(1 + e^-1) + 0.25 * log(1 + e^1) = 0.56328...
    losses, _, _ = sigmoid_loss(logps(-1.0), logps(-3.0), logps(-2.0), logps(-2.0), beta=0.5, label_smoothing=0.25)
    expected = 0.75 * math.log1p(math.exp(-1)) + 0.25 * math.log1p(math.exp(1))
    assert_close(losses, logps(expected))


def test_ipo_by_hand():
    # h = 2, beta 0.5: (2 - 1 / (2 * 0.5))^2 = 1.
    losses, _, _ = ipo_loss(logps(-1.0), logps(-3.0), logps(-2.0), logps(-2.0), beta=0.5)
    assert_close(losses, logps(1.0))


def test_hinge_by_hand():
    # h = 2, beta 0.25: max(0, 1 - 0.5) = 0.5; beta 1: max(0, 1 - 2) = 0.
    args = (logps(-1.0), logps(-3.0), logps(-2.0), logps(-2.0))
    assert_close(hinge_loss(*args, beta=0.25)[0], logps(0.5))
    assert_close(hinge_loss(*args, beta=1.0)[0], logps(0.0))


def test_robust_by_hand():
    # h = 2, beta 0.5, eps 0.25: (0.75 * log(1 + e^-1) - 0.25 * log(1 + e^1)) / 0.5
    losses, _, _ = robust_loss(logps(-1.0), logps(-3.0), logps(-2.0), logps(-2.0), beta=0.5, label_smoothing=0.25)
    expected = (0.75 * math.log1p(math.exp(-1)) - 0.25 * math.log1p(math.exp(1))) / 0.5
    assert_close(losses, logps(expected))


@pytest.mark.parametrize("name", ["sigmoid", "robust"])
def test_policy_equal_reference_gives_ln2_and_zero_rewards(name):
    p = logps(-5.0, -2.0, -7.5)
    r = logps(-4.0, -9.0, -1.0)
    losses, chosen, rejected = LOSSES[name](p, r, p.clone(), r.clone(), beta=0.3)
    assert_close(losses, torch.full((3,), LN2))
    assert_close(chosen, torch.zeros(3))
    assert_close(rejected, torch.zeros(3))


@pytest.mark.parametrize("name", list(LOSSES))
def test_swapping_chosen_and_rejected_negates_margin(name):
    pc, pr, rc, rr = logps(-1.0, -4.0), logps(-3.0, -2.5), logps(-2.0, -3.0), logps(-2.2, -2.0)
    _, c, r = LOSSES[name](pc, pr, rc, rr, beta=0.2)
    _, c2, r2 = LOSSES[name](pr, pc, rr, rc, beta=0.2)
    m = reward_metrics(c, r, pc, pr)["rewards/margins"]
    m2 = reward_metrics(c2, r2, pr, pc)["rewards/margins"]
    assert_close(m2, -m)


def test_cdpo_with_smoothing_half_is_symmetric():
    # eps = 0.5 weighs both orders equally: swapping chosen and rejected leaves the loss unchanged.
    pc, pr, rc, rr = logps(-1.0, -4.0), logps(-3.0, -2.5), logps(-2.0, -3.0), logps(-2.2, -2.0)
    a = sigmoid_loss(pc, pr, rc, rr, beta=0.7, label_smoothing=0.5)[0]
    b = sigmoid_loss(pr, pc, rr, rc, beta=0.7, label_smoothing=0.5)[0]
    assert_close(a, b)


def test_rewards_are_detached_and_losses_have_gradients():
    pc = logps(-1.0, -2.0).requires_grad_()
    pr = logps(-3.0, -1.0).requires_grad_()
    for name, fn in LOSSES.items():
        losses, c, r = fn(pc, pr, logps(-2.0, -2.0), logps(-2.0, -2.0), beta=0.1, label_smoothing=0.1)
        assert losses.shape == (2,), name
        assert not c.requires_grad and not r.requires_grad, name
        losses.sum().backward()
        assert pc.grad is not None and torch.all(pc.grad != 0), name
        pc.grad = None


def test_accuracy_is_strict():
    c = logps(1.0, 0.0, -1.0)
    r = logps(0.0, 0.0, 0.0)
    m = reward_metrics(c, r, c, r)
    assert_close(m["rewards/accuracies"], logps(1.0, 0.0, 0.0))
    assert tuple(m) == METRIC_NAMES
