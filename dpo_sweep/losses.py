"""DPO loss variants and reward metrics: pure functions on tensors, no model, no config.

B is the number of preference pairs. Every loss takes the policy's and the reference's
sequence log-probs of the chosen and rejected responses, each Shape: (B,), and returns
`(losses, chosen_rewards, rejected_rewards)`, each Shape: (B,). Losses are per pair (no
averaging here); rewards are detached: `beta * (policy_logps - ref_logps)`.

With h = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected), the log-ratio margin:
- sigmoid (DPO, Rafailov et al. 2023, eq. 7): -log sigmoid(beta h); with label smoothing eps
  (cDPO, Mitchell 2023): -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h).
- ipo (Azar et al. 2023, eq. 17): (h - 1 / (2 beta))^2, on length-averaged log-probs.
- hinge (SLiC, Zhao et al. 2023): max(0, 1 - beta h).
- robust (rDPO, Chowdhury et al. 2024, eq. 8):
  ((1 - eps) * -log sigmoid(beta h) - eps * -log sigmoid(-beta h)) / (1 - 2 eps).
"""

from __future__ import annotations

from typing import Callable, Dict, Tuple

import torch
import torch.nn.functional as F

Tensor = torch.Tensor
LossOutput = Tuple[Tensor, Tensor, Tensor]


def _margin_and_rewards(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> LossOutput:
    """Return h (B,), chosen rewards (B,), rejected rewards (B,)."""
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,)
    h = chosen_logratios - rejected_logratios  # (B,)
    return h, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


def sigmoid_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """DPO's logistic loss; cDPO when label_smoothing > 0. Shapes: (B,) in, (B,) x 3 out."""
    h, chosen_rewards, rejected_rewards = _margin_and_rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    return losses, chosen_rewards, rejected_rewards


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """IPO's squared loss pulling h towards 1 / (2 beta). Shapes: (B,) in, (B,) x 3 out."""
    h, chosen_rewards, rejected_rewards = _margin_and_rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    losses = (h - 1 / (2 * beta)) ** 2
    return losses, chosen_rewards, rejected_rewards


def hinge_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """SLiC's hinge loss on beta h. Shapes: (B,) in, (B,) x 3 out."""
    h, chosen_rewards, rejected_rewards = _margin_and_rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    losses = torch.relu(1 - beta * h)
    return losses, chosen_rewards, rejected_rewards


def robust_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """rDPO: an unbiased loss under label noise rate eps. Shapes: (B,) in, (B,) x 3 out."""
    h, chosen_rewards, rejected_rewards = _margin_and_rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    eps = label_smoothing
    losses = (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)
    return losses, chosen_rewards, rejected_rewards


LOSSES: Dict[str, Callable[..., LossOutput]] = {
    "sigmoid": sigmoid_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
    "robust": robust_loss,
}


METRIC_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected")


def reward_metrics(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
) -> Dict[str, Tensor]:
    """Per-pair values of TRL's DPO metrics, each Shape: (B,); average them to log.

    rewards/accuracies uses a strict `>` (a tie counts as wrong), as TRL does.
    """
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "rewards/margins": chosen_rewards - rejected_rewards,
        "logps/chosen": policy_chosen_logps.detach(),
        "logps/rejected": policy_rejected_logps.detach(),
    }
