"""Full-ranking evaluation: HR@10 and NDCG@10 with history masking (docs/method.md §7)."""

from __future__ import annotations

import torch

MISS = 2**31 - 1  # rank given to a target that is masked (in the history)


def rank_of_target(scores: torch.Tensor, target: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
    """1-based rank of `target` among all items.

    scores: (B, N+1) with column 0 the padding item; target: (B,); history: (B, H) item ids of
    the user's history (0 = padding). Column 0 and history items are set to -inf, so a target
    that repeats a history item is ranked last (always a miss), as in the authors' code.
    """
    scores = scores.float().clone()
    scores[:, 0] = float("-inf")
    scores.scatter_(1, history.long(), float("-inf"))
    t = scores.gather(1, target.long().unsqueeze(1))  # (B, 1)
    greater = (scores > t).sum(dim=1)
    rank = greater + 1
    # a masked (-inf) target is a miss whatever k is
    return torch.where(torch.isinf(t.squeeze(1)), torch.full_like(rank, MISS), rank)


def hr_ndcg(rank: torch.Tensor, k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    hit = (rank <= k).float()
    ndcg = hit / torch.log2(rank.float() + 1)
    return hit, ndcg
