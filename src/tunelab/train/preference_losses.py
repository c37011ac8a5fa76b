"""Preference losses on summed answer log-probabilities: DPO (and its conservative variant), IPO,
ORPO and SimPO, each one formula per pair, as its paper writes it.

Every function takes per-pair tensors (shape [pairs]) and returns the per-pair losses plus the
implicit rewards that the metrics report; the task sums the losses over a micro-batch and the loop
divides by the pairs of the whole accumulation window, so accumulation and data parallelism give
the gradient of one large batch.

Inputs: `chosen_logps` / `rejected_logps` are log pi(y | x) summed over exactly the answer's
supervised tokens; `ref_*` the same under the reference model; `chosen_tokens` / `rejected_tokens`
the number of those tokens (the length normalisation of ORPO and SimPO).

Defaults, from the papers:
- DPO  (Rafailov et al. 2023, "Direct Preference Optimization", eq. 7): beta = 0.1, the value of
  the paper's experiments unless it says otherwise (appendix B).
- cDPO (Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO"): labels
  flipped with probability eps, loss = (1 - eps) DPO(h) + eps DPO(-h); eps = 0 is plain DPO.
- IPO  (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
  Preferences", eq. 17): (h - 1 / (2 tau))^2 with h the difference of log-ratios summed over the
  answer, as in the paper (TRL averages them per token instead). The paper fixes no general tau;
  0.1, DPO's default, is used (as TRL does).
- ORPO (Hong, Lee & Thorne 2024, "ORPO: Monolithic Preference Optimization without Reference
  Model", eqs. 2-7): L_SFT + lambda L_OR with L_OR = -log sigmoid(log odds(y_w) - log odds(y_l)),
  odds(y) = P / (1 - P), P = exp(mean per-token log-prob); lambda = 0.1, the paper's setting for
  its models (and TRL's ORPOConfig default).
- SimPO (Meng, Xia & Chen 2024, "SimPO: Simple Preference Optimization with a Reference-Free
  Reward", eq. 6): -log sigmoid(beta / |y_w| log pi(y_w) - beta / |y_l| log pi(y_l) - gamma);
  beta = 2.0 and gamma = 1.0 (gamma / beta = 0.5), the values of the authors' released training
  configs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

LOSSES = ("dpo", "ipo", "orpo", "simpo")
REFERENCE_FREE = ("orpo", "simpo")
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "simpo": 2.0, "orpo": 0.1}  # orpo: lambda
DEFAULT_SIMPO_GAMMA = 1.0


@dataclass(frozen=True)
class PreferenceLoss:
    """One loss and its parameters; `beta` is DPO/IPO's beta (IPO's tau), SimPO's beta, ORPO's lambda."""

    name: str = "dpo"
    beta: float = 0.1
    label_smoothing: float = 0.0  # cDPO's eps (dpo only)
    gamma: float = DEFAULT_SIMPO_GAMMA  # SimPO's target margin

    @property
    def needs_reference(self) -> bool:
        return self.name not in REFERENCE_FREE

    def __call__(self, chosen_logps, rejected_logps, chosen_tokens, rejected_tokens,
                 ref_chosen_logps=None, ref_rejected_logps=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(per-pair loss, chosen reward, rejected reward), each of shape [pairs]."""
        if self.name == "dpo":
            return dpo(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, self.beta, self.label_smoothing)
        if self.name == "ipo":
            return ipo(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, self.beta)
        if self.name == "orpo":
            return orpo(chosen_logps, rejected_logps, chosen_tokens, rejected_tokens, self.beta)
        if self.name == "simpo":
            return simpo(chosen_logps, rejected_logps, chosen_tokens, rejected_tokens, self.beta, self.gamma)
        raise ValueError(f"unknown preference loss {self.name!r}; use one of {list(LOSSES)}")


def dpo(chosen, rejected, ref_chosen, ref_rejected, beta: float, label_smoothing: float = 0.0):
    """-(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h), h = the difference of log-ratios.
    Rewards: beta (log pi - log pi_ref) of each answer (DPO's implicit reward, section 5)."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    z = beta * (chosen_ratio - rejected_ratio)
    loss = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return loss, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def ipo(chosen, rejected, ref_chosen, ref_rejected, tau: float):
    """(h - 1 / (2 tau))^2; rewards as DPO's, with tau in beta's place."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    loss = (chosen_ratio - rejected_ratio - 1.0 / (2.0 * tau)) ** 2
    return loss, tau * chosen_ratio.detach(), tau * rejected_ratio.detach()


def orpo(chosen, rejected, chosen_tokens, rejected_tokens, lam: float):
    """Mean per-token NLL of the chosen answer + lambda * -log sigmoid(log odds ratio).
    log odds(y) = log P - log(1 - P) with log P the mean per-token log-prob (the paper's eq. 4);
    rewards: lambda x mean per-token log-prob of each answer (TRL's ORPO reports the same)."""
    mean_c, mean_r = chosen / chosen_tokens, rejected / rejected_tokens
    log_odds = (mean_c - mean_r) - (torch.log1p(-torch.exp(mean_c)) - torch.log1p(-torch.exp(mean_r)))
    loss = -mean_c - lam * F.logsigmoid(log_odds)
    return loss, lam * mean_c.detach(), lam * mean_r.detach()


def simpo(chosen, rejected, chosen_tokens, rejected_tokens, beta: float, gamma: float):
    """-log sigmoid(beta mean log pi(y_w) - beta mean log pi(y_l) - gamma); rewards: beta x mean log-prob."""
    reward_c, reward_r = beta * chosen / chosen_tokens, beta * rejected / rejected_tokens
    loss = -F.logsigmoid(reward_c - reward_r - gamma)
    return loss, reward_c.detach(), reward_r.detach()


def loss_from_config(p) -> PreferenceLoss:
    """The loss a `preference:` config section describes (its None beta: the loss's paper default)."""
    beta = p.beta if p.beta is not None else DEFAULT_BETA[p.loss]
    if p.loss == "orpo":
        beta = p.orpo_lambda
    return PreferenceLoss(p.loss, beta, p.label_smoothing, p.simpo_gamma)
