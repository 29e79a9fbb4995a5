"""Loss values pinned against numbers computed by hand (see the comments for the arithmetic)."""

import math

import pytest
import torch

from oaif.step.losses import margin_loss, preference_loss

BETA = 0.25
# Three pairs with margins rho = 1, -2, 8:
#   pair 0: (pc - rc) - (pr - rr) = (-1 + 1.5) - (-2 + 1.5) = 0.5 + 0.5 = 1
#   pair 1: (-3 + 2) - (-1 + 2) = -1 - 1 = -2
#   pair 2: (0 - 0) - (-8 - 0) = 8
PC = torch.tensor([-1.0, -3.0, 0.0])
PR = torch.tensor([-2.0, -1.0, -8.0])
RC = torch.tensor([-1.5, -2.0, 0.0])
RR = torch.tensor([-1.5, -2.0, 0.0])

HARD = {
    # -log sigmoid(beta * rho) = log(1 + exp(-beta * rho)):
    #   log(1 + e^-0.25) = log(1.7788007831) = 0.5759394199
    #   log(1 + e^0.5)   = log(2.6487212707) = 0.9740769842
    #   log(1 + e^-2)    = log(1.1353352832) = 0.1269280110
    "dpo": [0.5759394199, 0.9740769842, 0.1269280110],
    # (rho - 1/(2 beta))^2 with 1/(2 beta) = 2: (1-2)^2, (-2-2)^2, (8-2)^2
    "ipo": [1.0, 16.0, 36.0],
    # max(0, 1 - beta * rho): 1 - 0.25, 1 + 0.5, max(0, 1 - 2)
    "slic": [0.75, 1.5, 0.0],
}

# Soft label p = 0.75 on pair 0 (rho = 1): p * l(rho) + (1 - p) * l(-rho)
SOFT_PAIR0 = {
    # 0.75 * 0.5759394199 + 0.25 * log(1 + e^0.25) = 0.4319545649 + 0.25 * 0.8259394199
    "dpo": 0.6384394199,
    # 0.75 * (1 - 2)^2 + 0.25 * (-1 - 2)^2 = 0.75 + 2.25
    "ipo": 3.0,
    # 0.75 * 0.75 + 0.25 * 1.25
    "slic": 0.875,
}


@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "slic"])
def test_hard_labels_match_hand_values(loss_type):
    out = preference_loss(PC, PR, RC, RR, BETA, loss_type)
    assert out.losses.shape == (3,)
    torch.testing.assert_close(out.losses, torch.tensor(HARD[loss_type]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.margins, torch.tensor([1.0, -2.0, 8.0]))
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.125, -0.25, 0.0]))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([-0.125, 0.25, -2.0]))


@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "slic"])
def test_soft_labels_match_hand_values(loss_type):
    p = torch.tensor([0.75, 1.0, 1.0])
    out = preference_loss(PC, PR, RC, RR, BETA, loss_type, label_probs=p)
    expected = torch.tensor([SOFT_PAIR0[loss_type]] + HARD[loss_type][1:])
    torch.testing.assert_close(out.losses, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("loss_type", ["dpo", "ipo", "slic"])
def test_label_one_equals_hard_and_half_is_symmetric(loss_type):
    hard = preference_loss(PC, PR, RC, RR, BETA, loss_type).losses
    ones = preference_loss(PC, PR, RC, RR, BETA, loss_type, label_probs=torch.ones(3)).losses
    torch.testing.assert_close(hard, ones)
    half = preference_loss(PC, PR, RC, RR, BETA, loss_type, label_probs=torch.full((3,), 0.5)).losses
    swapped = preference_loss(PR, PC, RR, RC, BETA, loss_type, label_probs=torch.full((3,), 0.5)).losses
    torch.testing.assert_close(half, swapped)


def test_ipo_soft_optimum_is_at_the_expected_margin():
    # the soft IPO loss is minimised at rho = (2p - 1) / (2 beta)
    p = 0.8
    rho = torch.linspace(-5, 5, 10001)
    soft = p * margin_loss(rho, BETA, "ipo") + (1 - p) * margin_loss(-rho, BETA, "ipo")
    assert rho[soft.argmin()].item() == pytest.approx((2 * p - 1) / (2 * BETA), abs=2e-3)


def test_gradient_pushes_chosen_up_and_rejected_down():
    pc = torch.tensor([-1.0], requires_grad=True)
    pr = torch.tensor([-1.0], requires_grad=True)
    for loss_type in ("dpo", "ipo", "slic"):
        pc.grad = pr.grad = None
        preference_loss(pc, pr, torch.tensor([-1.0]), torch.tensor([-1.0]), BETA, loss_type).losses.sum().backward()
        assert pc.grad.item() < 0 < pr.grad.item(), loss_type


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown loss type"):
        preference_loss(PC, PR, RC, RR, BETA, "kto")
    with pytest.raises(ValueError, match="beta"):
        preference_loss(PC, PR, RC, RR, 0.0, "dpo")
    assert math.isfinite(preference_loss(PC * 1e4, PR, RC, RR, BETA, "dpo").losses.sum().item())
