"""DPO and GRPO losses against the formulas written out independently, in plain Python floats."""
from __future__ import annotations

import math

import pytest
import torch

from astrai_train.objectives.logprobs import masked_mean, shifted_logprobs, token_logprobs
from astrai_train.objectives.policy_loss import clipped_policy_loss, group_advantages, k3_kl
from astrai_train.objectives.preference_loss import preference_loss


def _logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# Hand-made sequence log-probs for 3 pairs: policy/reference chosen/rejected.
PC = [-10.0, -4.0, -7.5]
PR = [-12.0, -3.0, -7.5]
RC = [-11.0, -4.5, -6.0]
RR = [-11.5, -2.0, -9.0]


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_sigmoid_matches_formula(beta: float) -> None:
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    out = preference_loss(t(PC), t(PR), t(RC), t(RR), beta=beta, loss_type="sigmoid")
    losses, rc, rr = [], [], []
    for pc, pr, rc_, rr_ in zip(PC, PR, RC, RR):
        h = (pc - rc_) - (pr - rr_)
        losses.append(-_logsigmoid(beta * h))
        rc.append(beta * (pc - rc_))
        rr.append(beta * (pr - rr_))
    assert out.loss.item() == pytest.approx(sum(losses) / 3, rel=1e-12)
    m = out.metrics()
    assert m["rewards/chosen"].item() == pytest.approx(sum(rc) / 3)
    assert m["rewards/rejected"].item() == pytest.approx(sum(rr) / 3)
    assert m["rewards/margins"].item() == pytest.approx(sum(a - b for a, b in zip(rc, rr)) / 3)
    assert m["rewards/accuracies"].item() == pytest.approx(sum(a > b for a, b in zip(rc, rr)) / 3)


def test_dpo_label_smoothing_and_ipo_match_formula() -> None:
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    beta, eps = 0.2, 0.1
    smooth = preference_loss(t(PC), t(PR), t(RC), t(RR), beta=beta, label_smoothing=eps)
    ipo = preference_loss(t(PC), t(PR), t(RC), t(RR), beta=beta, loss_type="ipo")
    exp_s, exp_i = 0.0, 0.0
    for pc, pr, rc_, rr_ in zip(PC, PR, RC, RR):
        h = (pc - rc_) - (pr - rr_)
        exp_s += -(1 - eps) * _logsigmoid(beta * h) - eps * _logsigmoid(-beta * h)
        exp_i += (h - 1 / (2 * beta)) ** 2
    assert smooth.loss.item() == pytest.approx(exp_s / 3, rel=1e-12)
    assert ipo.loss.item() == pytest.approx(exp_i / 3, rel=1e-12)


def test_dpo_rejects_bad_values() -> None:
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="hinge"):
        preference_loss(x, x, x, x, loss_type="hinge")
    with pytest.raises(ValueError, match="beta=0"):
        preference_loss(x, x, x, x, beta=0)


def test_dpo_gradient_pushes_chosen_up() -> None:
    pc = torch.tensor([-5.0], requires_grad=True)
    pr = torch.tensor([-5.0], requires_grad=True)
    preference_loss(pc, pr, torch.tensor([-5.0]), torch.tensor([-5.0])).loss.backward()
    assert pc.grad.item() < 0 < pr.grad.item()


def test_group_advantages_match_formula() -> None:
    rewards = [1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 5.0]
    adv = group_advantages(torch.tensor(rewards), group_size=4, eps=1e-4)
    expected = []
    for g in range(2):
        grp = rewards[4 * g:4 * g + 4]
        mean = sum(grp) / 4
        std = math.sqrt(sum((r - mean) ** 2 for r in grp) / 3)
        expected += [(r - mean) / (std + 1e-4) for r in grp]
    assert adv.tolist() == pytest.approx(expected, rel=1e-5)
    flat = group_advantages(torch.tensor([3.0, 3.0, 1.0, 2.0]), group_size=2, scale=False)
    assert flat.tolist() == pytest.approx([0.0, 0.0, -0.5, 0.5])
    with pytest.raises(ValueError, match="group_size=3"):
        group_advantages(torch.zeros(4), group_size=3)


def _reference_policy_loss(lp, old, adv, mask, eps, eps_high, ref, kl_coef, aggregation):
    """The GRPO objective written token by token."""
    per_seq, all_tokens, n_tokens = [], 0.0, 0
    kl_sum = 0.0
    for b in range(len(lp)):
        seq_sum, seq_n = 0.0, 0
        for t in range(len(lp[b])):
            if not mask[b][t]:
                continue
            ratio = math.exp(lp[b][t] - old[b][t])
            clipped = min(max(ratio, 1 - eps), 1 + eps_high)
            term = -min(ratio * adv[b], clipped * adv[b])
            if ref is not None:
                d = ref[b][t] - lp[b][t]
                kl = math.exp(d) - d - 1
                kl_sum += kl
                term += kl_coef * kl
            seq_sum += term
            seq_n += 1
        per_seq.append(seq_sum / seq_n)
        all_tokens += seq_sum
        n_tokens += seq_n
    loss = all_tokens / n_tokens if aggregation == "token" else sum(per_seq) / len(per_seq)
    return loss, kl_sum / n_tokens


# Ratios chosen to land on every side of the clip range: 1.5 and 0.6 (clipped at 0.2), 1.1 (inside).
LP = [[-1.0, math.log(1.5) - 2.0, -0.3, 0.0], [-0.5, math.log(0.6) - 1.0, -2.0, -1.0]]
OLD = [[-1.0, -2.0, -0.3 - math.log(1.1), 0.0], [-0.5, -1.0, -2.0, -1.0]]
REF = [[-1.2, -1.5, -0.1, 0.0], [-0.7, -0.9, -2.5, -1.0]]
MASK = [[1, 1, 1, 0], [1, 1, 0, 0]]


@pytest.mark.parametrize("aggregation", ["token", "sequence"])
@pytest.mark.parametrize("adv", [[1.5, -0.7], [-1.0, 2.0]])
@pytest.mark.parametrize("kl_coef,eps_high", [(0.0, None), (0.1, None), (0.05, 0.28)])
def test_clipped_policy_loss_matches_formula(aggregation, adv, kl_coef, eps_high) -> None:
    t = lambda xs: torch.tensor(xs, dtype=torch.float64)  # noqa: E731
    out = clipped_policy_loss(t(LP), t(OLD), t(adv), t(MASK), clip_eps=0.2, clip_eps_high=eps_high,
                              ref_logprobs=t(REF) if kl_coef else None, kl_coef=kl_coef, aggregation=aggregation)
    expected, kl = _reference_policy_loss(LP, OLD, adv, MASK, 0.2, eps_high or 0.2,
                                          REF if kl_coef else None, kl_coef, aggregation)
    assert out.loss.item() == pytest.approx(expected, rel=1e-10)
    assert out.kl.item() == pytest.approx(kl, rel=1e-10, abs=1e-15)
    assert 0 < out.clip_frac.item() < 1


def test_clipping_stops_gradient_outside_the_trust_region() -> None:
    # ratio 1.5 with positive advantage is clipped: no gradient; ratio 0.6 with positive advantage is not.
    lp = torch.tensor([[math.log(1.5), math.log(0.6)]], requires_grad=True)
    out = clipped_policy_loss(lp, torch.zeros(1, 2), torch.tensor([1.0]), torch.ones(1, 2), clip_eps=0.2)
    out.loss.backward()
    assert lp.grad[0, 0].item() == 0.0 and lp.grad[0, 1].item() != 0.0


def test_k3_kl_is_nonnegative_and_zero_at_equality() -> None:
    a = torch.randn(100, dtype=torch.float64)
    b = torch.randn(100, dtype=torch.float64)
    assert (k3_kl(a, b) >= 0).all()
    assert k3_kl(a, a).abs().max().item() == 0.0


def test_token_logprobs_equal_log_softmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    ids = torch.randint(0, 11, (2, 5))
    got = shifted_logprobs(logits, ids)
    want = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(got, want)
    padded = token_logprobs(logits, torch.full((2, 5), -100))
    assert padded.abs().max().item() == 0.0
    assert masked_mean(torch.ones(1, 3), torch.zeros(1, 3)).item() == 0.0
