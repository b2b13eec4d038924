import math

import torch

from iisan.training.loss import inbatch_debiased_ce
from iisan.training.metrics import hr_ndcg, rank_of_target


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
    import iisan.training.loss as loss_mod

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
    # ties: the smaller item id first (docs/method.md §7)
    order = sorted(range(len(s)), key=lambda i: (-s[i].item(), i))
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


def test_ranking_with_ties_matches_brute_force():
    """Scores on a coarse grid (as bf16 / fp16 scores are): many ties, each broken by item id."""
    g = torch.Generator().manual_seed(2)
    B, N = 200, 40
    scores = torch.randint(0, 6, (B, N + 1), generator=g).float()
    target = torch.randint(1, N + 1, (B,), generator=g)
    history = torch.randint(0, N + 1, (B, 5), generator=g)
    ranks = rank_of_target(scores, target, history)
    for b in range(B):
        assert int(ranks[b]) == brute_force_rank(scores[b], int(target[b]), history[b].tolist())


def test_a_target_tied_with_k_others_is_ranked_behind_the_smaller_ids():
    """rank = 1 + #higher + #tied with a smaller id; over the tied items' ids the expected rank
    is 1 + #higher + k / 2."""
    N, higher, k = 30, 3, 4
    tied = [6, 11, 17, 23, 29]  # the target and its k = 4 tied others
    scores = torch.zeros(1, N + 1)
    scores[0, [2, 8, 20]] = 5.0  # `higher` items above the tie
    scores[0, tied] = 1.0
    history = torch.tensor([[20, 0]])  # a masked item never counts, even one scoring higher
    got = [int(rank_of_target(scores, torch.tensor([t]), history)) for t in tied]
    assert got == [1 + (higher - 1) + j for j in range(k + 1)]
    assert sum(got) / len(got) == 1 + (higher - 1) + k / 2
    # masked items tied with the target do not count either: of its four smaller tied ids, 17 and 23
    assert int(rank_of_target(scores, torch.tensor([29]), torch.tensor([[6, 11]]))) == 1 + higher + 2


def test_ties_at_the_top10_cut_hr_and_ndcg():
    """9 items above a tie of three: the tied item with the smallest id is rank 10 (a hit), the
    others 11 and 12 (misses)."""
    N = 50
    scores = torch.linspace(0, 1, N + 1).unsqueeze(0).repeat(3, 1)  # item i scores i / 50
    scores[:, [12, 30, 40]] = 0.83  # below items 42..50 (9 items), above the rest
    target = torch.tensor([12, 30, 40])
    history = torch.zeros(3, 1, dtype=torch.long)
    ranks = rank_of_target(scores, target, history)
    assert ranks.tolist() == [10, 11, 12]
    hit, ndcg = hr_ndcg(ranks, 10)
    assert hit.tolist() == [1.0, 0.0, 0.0]
    assert math.isclose(float(ndcg[0]), 1 / math.log2(11), rel_tol=1e-6) and ndcg[1:].tolist() == [0.0, 0.0]
    # the mean over the three ids is the expected HR@10 / NDCG@10 of a random order among them
    assert math.isclose(float(hit.mean()), 1 / 3, rel_tol=1e-6)
    assert math.isclose(float(ndcg.mean()), 1 / math.log2(11) / 3, rel_tol=1e-6)


def test_rank_is_the_position_in_a_stable_descending_sort():
    """The rule is the target's position in argsort(descending=True, stable=True) of the masked
    scores, the order the authors' GPU evaluation gets from argsort on their catalogues; bf16
    scores give many ties."""
    from iisan.training.metrics import masked_scores

    g = torch.Generator().manual_seed(3)
    B, N = 64, 5000
    scores = (torch.randn(B, N + 1, generator=g) * 0.05).bfloat16()
    target = torch.randint(1, N + 1, (B,), generator=g)
    history = torch.randint(0, N + 1, (B, 8), generator=g)
    ranks = rank_of_target(scores, target, history)
    order = torch.argsort(masked_scores(scores, history), dim=1, descending=True, stable=True)
    pos = (order == target.unsqueeze(1)).float().argmax(1) + 1
    masked = (history == target.unsqueeze(1)).any(1)
    assert torch.equal(ranks[~masked], pos[~masked]) and (ranks[masked] == 2**31 - 1).all()
    t = scores.float().gather(1, target.unsqueeze(1))
    assert ((scores.float() == t).sum(1) > 1).float().mean() > 0.5  # most targets are tied
