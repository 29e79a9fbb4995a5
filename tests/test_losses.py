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


# -- the length-normalised losses and label smoothing ---------------------------------------------
# Token counts of the three pairs' chosen and rejected responses.
LC = torch.tensor([2.0, 4.0, 1.0])
LR = torch.tensor([4.0, 1.0, 8.0])


def test_simpo_matches_hand_values_without_a_reference():
    # average log-probs: chosen PC/LC = [-1/2, -3/4, 0/1] = [-0.5, -0.75, 0]; rejected PR/LR = [-2/4, -1/1, -8/8]
    #   = [-0.5, -1, -1]; margins m = [0, 0.25, 1]
    # beta 2, gamma/beta 0.5: -log sigmoid(2 * (m - 0.5)) = log(1 + exp(-2 (m - 0.5))) = log(1 + e^1), log(1 + e^0.5),
    #   log(1 + e^-1) = 1.3132616875, 0.9740769842, 0.3132616875 (log(1 + e) = 1 + log(1 + e^-1))
    out = preference_loss(PC, PR, None, None, 2.0, "simpo", lengths=(LC, LR), gamma_beta_ratio=0.5)
    torch.testing.assert_close(out.losses, torch.tensor([1.3132616875, 0.9740769842, 0.3132616875]), atol=1e-6, rtol=0)
    # SimPO's reward is beta * log pi(y)/|y|: chosen 2 * [-0.5, -0.75, 0], rejected 2 * [-0.5, -1, -1]
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([-1.0, -1.5, 0.0]))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([-1.0, -2.0, -2.0]))
    torch.testing.assert_close(out.margins, torch.tensor([0.0, 0.25, 1.0]))
    # soft label 0.75 on pair 1: swapped, the margin is -0.25 and the argument 2 * (-0.25 - 0.5) = -1.5:
    #   0.75 * 0.9740769842 + 0.25 * log(1 + e^1.5) = 0.7305577381 + 0.25 * 1.7014132780 = 1.1559110576
    soft = preference_loss(PC, PR, None, None, 2.0, "simpo", torch.tensor([1.0, 0.75, 1.0]), lengths=(LC, LR),
                           gamma_beta_ratio=0.5)
    torch.testing.assert_close(soft.losses[1], torch.tensor(1.1559110576), atol=1e-6, rtol=0)


def test_rpo_is_dpo_plus_the_chosen_nll_per_token():
    # DPO (HARD["dpo"]) + alpha * (-PC/LC) with alpha 1: NLL per token [0.5, 0.75, 0]
    #   0.5759394199 + 0.5, 0.9740769842 + 0.75, 0.1269280110 + 0
    out = preference_loss(PC, PR, RC, RR, BETA, "rpo", lengths=(LC, LR), alpha=1.0)
    torch.testing.assert_close(out.losses, torch.tensor([1.0759394199, 1.7240769842, 0.1269280110]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.125, -0.25, 0.0]))  # DPO's rewards
    half = preference_loss(PC, PR, RC, RR, BETA, "rpo", lengths=(LC, LR), alpha=0.5).losses
    torch.testing.assert_close(half, torch.tensor([0.8259394199, 1.3490769842, 0.1269280110]), atol=1e-6, rtol=0)
    # soft label 0.75 on pair 0: swapped, DPO's loss is log(1 + e^0.25) = 0.8259394199 and the NLL is the rejected
    #   response's, -PR/LR = 2/4 = 0.5: 0.75 * 1.0759394199 + 0.25 * 1.3259394199 = 0.8069545649 + 0.3314848550
    soft = preference_loss(PC, PR, RC, RR, BETA, "rpo", torch.tensor([0.75, 1.0, 1.0]), lengths=(LC, LR), alpha=1.0)
    torch.testing.assert_close(soft.losses[0], torch.tensor(1.1384394199), atol=1e-6, rtol=0)


def test_rdpo_adds_the_length_difference_inside_the_sigmoid():
    # -log sigmoid(beta * rho + alpha * (|y_c| - |y_r|)), beta 0.25, alpha 0.1, rho = [1, -2, 8], LC - LR = [-2, 3, -7]:
    #   arguments 0.25 - 0.2 = 0.05, -0.5 + 0.3 = -0.2, 2 - 0.7 = 1.3
    #   log(1 + e^-0.05) = log(1.9512294245) = 0.6684596480
    #   log(1 + e^0.2)   = log(2.2214027582) = 0.7981388694
    #   log(1 + e^-1.3)  = log(1.2725317930) = 0.2410084538
    out = preference_loss(PC, PR, RC, RR, BETA, "rdpo", lengths=(LC, LR), alpha=0.1)
    torch.testing.assert_close(out.losses, torch.tensor([0.6684596480, 0.7981388694, 0.2410084538]), atol=1e-6, rtol=0)
    torch.testing.assert_close(out.margins, torch.tensor([1.0, -2.0, 8.0]))  # rho, as for DPO
    # alpha 0 is DPO
    torch.testing.assert_close(preference_loss(PC, PR, RC, RR, BETA, "rdpo", lengths=(LC, LR)).losses,
                               torch.tensor(HARD["dpo"]), atol=1e-6, rtol=0)


def test_rdpo_pushes_harder_where_the_shorter_response_won():
    # at rho = 0 DPO's loss is log 2; a longer chosen response explains part of its win (less loss, less push),
    # a shorter one needs a larger margin (Park et al. 2024: the implicit reward is beta * log-ratio + alpha |y|)
    zero = torch.zeros(2)
    out = preference_loss(zero, zero, zero, zero, BETA, "rdpo", lengths=(torch.tensor([9.0, 3.0]), torch.tensor([3.0, 9.0])),
                          alpha=0.1).losses
    assert out[0] < math.log(2) < out[1]


def test_label_smoothing_is_cdpo_and_its_ipo_form():
    # cDPO: (1 - eps) l(rho) + eps l(-rho); for DPO l(-rho) - l(rho) = beta * rho, so it is l(rho) + eps * beta * rho:
    #   eps 0.1: 0.5759394199 + 0.025, 0.9740769842 - 0.05, 0.1269280110 + 0.2
    dpo = preference_loss(PC, PR, RC, RR, BETA, "dpo", label_smoothing=0.1).losses
    torch.testing.assert_close(dpo, torch.tensor([0.6009394199, 0.9240769842, 0.3269280110]), atol=1e-6, rtol=0)
    # IPO: 0.9 (rho - 2)^2 + 0.1 (-rho - 2)^2 = 0.9 * 1 + 0.1 * 9, 0.9 * 16 + 0.1 * 0, 0.9 * 36 + 0.1 * 100
    ipo = preference_loss(PC, PR, RC, RR, BETA, "ipo", label_smoothing=0.1).losses
    torch.testing.assert_close(ipo, torch.tensor([1.8, 14.4, 42.4]), atol=1e-5, rtol=0)
    # with a soft label p = 0.75 the label becomes 0.75 * 0.9 + 0.25 * 0.1 = 0.7: on pair 0
    #   0.7 * 0.5759394199 + 0.3 * 0.8259394199 = 0.5759394199 + 0.3 * 0.25 = 0.6509394199
    soft = preference_loss(PC, PR, RC, RR, BETA, "dpo", torch.tensor([0.75, 1.0, 1.0]), label_smoothing=0.1).losses
    torch.testing.assert_close(soft[0], torch.tensor(0.6509394199), atol=1e-6, rtol=0)


def test_smoothed_ipo_optimum_shrinks_to_one_minus_two_eps_over_two_beta():
    rho = torch.linspace(-5, 5, 10001)
    zero = torch.zeros_like(rho)
    smoothed = preference_loss(rho, zero, zero, zero, BETA, "ipo", label_smoothing=0.1).losses
    assert rho[smoothed.argmin()].item() == pytest.approx((1 - 2 * 0.1) / (2 * BETA), abs=2e-3)


@pytest.mark.parametrize("loss_type", ["slic", "simpo", "rpo", "rdpo"])
def test_label_smoothing_is_refused_where_it_has_no_form(loss_type):
    ref = (None, None) if loss_type == "simpo" else (RC, RR)
    with pytest.raises(ValueError, match=f"label_smoothing applies to dpo and ipo, not {loss_type}"):
        preference_loss(PC, PR, *ref, BETA, loss_type, lengths=(LC, LR), label_smoothing=0.1)


@pytest.mark.parametrize("loss_type", ["simpo", "rpo", "rdpo"])
def test_length_losses_push_chosen_up_and_rejected_down(loss_type):
    pc = torch.tensor([-4.0], requires_grad=True)
    pr = torch.tensor([-4.0], requires_grad=True)
    ref = (None, None) if loss_type == "simpo" else (torch.tensor([-4.0]), torch.tensor([-4.0]))
    out = preference_loss(pc, pr, *ref, 2.0 if loss_type == "simpo" else BETA, loss_type,
                          lengths=(torch.tensor([4.0]), torch.tensor([4.0])), alpha=0.1)
    out.losses.sum().backward()
    assert pc.grad.item() < 0 < pr.grad.item()


def test_length_losses_need_lengths_and_reference_losses_a_reference():
    with pytest.raises(ValueError, match="simpo needs the responses' token counts"):
        preference_loss(PC, PR, None, None, 2.0, "simpo")
    with pytest.raises(ValueError, match="rpo needs the reference log-probs"):
        preference_loss(PC, PR, None, None, BETA, "rpo", lengths=(LC, LR))
