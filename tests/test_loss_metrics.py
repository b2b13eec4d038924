import math

import torch

from iisan.loss import inbatch_debiased_ce
from iisan.metrics import hr_ndcg, rank_of_target


def brute_force_loss(U, E, ids, log_pop):
    B, S, D = E.shape
    cols = [(i, k) for i in range(B) for k in range(S)]
    total, n = 0.0, 0
    for i in range(B):
        window = set(ids[i].tolist())
        for j in range(S - 1):
            if ids[i, j] == 0:
                continue
            logits = []
            for (i2, k2) in cols:
                item = int(ids[i2, k2])
                is_pos = (i2, k2) == (i, j + 1)
                if item == 0 or (item in window and not is_pos):
                    logits.append(-1e4)
                else:
                    logits.append(float(U[i, j] @ E[i2, k2]) - float(log_pop[item]))
            logits = torch.tensor(logits, dtype=torch.float64)
            target = cols.index((i, j + 1))
            total += float(-(logits[target] - torch.logsumexp(logits, 0)))
            n += 1
    return total / n


def test_loss_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    for trial in range(5):
        B, S, D, N = 4, 6, 8, 9  # few items -> many repeats inside and across users
        ids = torch.randint(1, N + 1, (B, S), generator=g)
        for i in range(B):  # left padding of random length
            ids[i, : int(torch.randint(0, S - 2, (1,), generator=g))] = 0
        U = torch.randn(B, S - 1, D, generator=g, dtype=torch.float64)
        E = torch.randn(B, S, D, generator=g, dtype=torch.float64)
        p = torch.rand(N + 1, generator=g, dtype=torch.float64) + 0.01
        p[0] = 1.0
        log_pop = p.log()
        got = inbatch_debiased_ce(U, E, ids, log_pop)
        assert math.isclose(float(got), brute_force_loss(U, E, ids, log_pop), rel_tol=1e-9), trial


def test_logits_are_fp32_under_bf16_autocast(monkeypatch):
    """docs/method.md §6: under autocast the encoders' bf16 outputs are cast to fp32 before the
    matmul, so the logits are the fp32 products (not bf16 ones widened afterwards)."""
    import iisan.loss as loss_mod

    g = torch.Generator().manual_seed(0)
    B, S, D, N = 4, 6, 16, 30
    ids = torch.randint(1, N + 1, (B, S), generator=g)
    log_pop = torch.log(torch.rand(N + 1, generator=g) + 0.01)
    U = torch.randn(B, S - 1, D, generator=g).bfloat16()
    E = torch.randn(B, S, D, generator=g).bfloat16()
    seen = []
    real = loss_mod.F.cross_entropy
    monkeypatch.setattr(loss_mod.F, "cross_entropy", lambda logits, *a, **k: seen.append(logits) or real(logits, *a, **k))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = inbatch_debiased_ce(U, E, ids, log_pop)
    logits = seen[0]
    assert logits.dtype == torch.float32 and loss.dtype == torch.float32
    want = U.reshape(-1, D).float() @ E.reshape(-1, D).float().T - log_pop[ids.reshape(-1)]
    kept = logits != -1e4
    assert torch.equal(logits[kept], want[kept])
    assert not torch.equal(logits[kept], logits[kept].bfloat16().float())  # not a bf16 matmul's output


def test_loss_masks_repeated_positive_of_other_user():
    # user 1 holds the positive item of user 0 -> that column must not act as a negative
    ids = torch.tensor([[0, 1, 2], [0, 2, 3]])
    U = torch.zeros(2, 2, 4)
    E = torch.randn(2, 3, 4)
    base = inbatch_debiased_ce(U, E, ids, torch.zeros(4))
    # with all-zero scores the loss is log(#unmasked columns); row (0,1) -> target slot 2 (item 2):
    # unmasked are its positive and user 1's item 3 (user 1's item 2 is masked) -> log 2
    # row (1,1) -> item 3, unmasked: positive, user 0's item 1 -> log 2
    assert math.isclose(float(base), math.log(2), rel_tol=1e-6)


def brute_force_rank(scores, target, history):
    s = scores.clone().float()
    s[0] = float("-inf")
    for h in history:
        s[h] = float("-inf")
    if torch.isinf(s[target]):
        return 2**31 - 1
    order = sorted(range(len(s)), key=lambda i: (-s[i].item(), i != target))
    return order.index(target) + 1


def test_ranking_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    B, N = 50, 30
    scores = torch.randn(B, N + 1, generator=g)
    target = torch.randint(1, N + 1, (B,), generator=g)
    history = torch.randint(0, N + 1, (B, 5), generator=g)
    ranks = rank_of_target(scores, target, history)
    for b in range(B):
        assert int(ranks[b]) == brute_force_rank(scores[b], int(target[b]), history[b].tolist())
    hit, ndcg = hr_ndcg(ranks, 10)
    for b in range(B):
        r = int(ranks[b])
        assert float(hit[b]) == (1.0 if r <= 10 else 0.0)
        assert math.isclose(float(ndcg[b]), 1 / math.log2(r + 1) if r <= 10 else 0.0, rel_tol=1e-6)


def test_target_in_history_is_a_miss():
    scores = torch.tensor([[0.0, 5.0, 1.0, 0.5]])
    r = rank_of_target(scores, torch.tensor([1]), torch.tensor([[1]]))
    assert float(hr_ndcg(r, 10)[0]) == 0.0
    assert int(rank_of_target(scores, torch.tensor([2]), torch.tensor([[1]]))) == 1
