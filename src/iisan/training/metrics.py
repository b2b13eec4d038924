"""Full-ranking evaluation: HR@10 and NDCG@10 with history masking (docs/method.md §7)."""

from __future__ import annotations

import torch

MISS = 2**31 - 1  # rank given to a target that is masked (in the history)


def masked_scores(scores: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
    """fp32 copy of `scores` (B, N+1) with column 0 (padding) and each user's history items
    (history: (B, H) item ids, 0 = padding) set to -inf."""
    scores = scores.float().clone()
    scores[:, 0] = float("-inf")
    scores.scatter_(1, history.long(), float("-inf"))
    return scores


def rank_of_target(scores: torch.Tensor, target: torch.Tensor, history: torch.Tensor) -> torch.Tensor:
    """1-based rank of `target` among all items.

    scores: (B, N+1) with column 0 the padding item; target: (B,); history: (B, H) item ids of
    the user's history (0 = padding). Column 0 and history items are set to -inf, so a target
    that repeats a history item is ranked last (always a miss), as in the authors' code.

    Ties: an item whose score equals the target's is ranked ahead of it when its id is smaller,
    so rank = 1 + #(items scoring higher) + #(items scoring the same with a smaller id). This is
    the target's position in a stable descending sort of the scores (`torch.argsort(...,
    descending=True, stable=True)`), the order the authors' evaluation takes from argsort on a
    GPU for a catalogue of more than 4096 items. Over the ids the tied items happen to have, the
    target is equally likely to come anywhere among them, so the expected rank is
    1 + #higher + #(tied others) / 2 (docs/method.md §7).
    """
    scores = masked_scores(scores, history)
    target = target.long().unsqueeze(1)
    t = scores.gather(1, target)  # (B, 1)
    ids = torch.arange(scores.shape[1], device=scores.device).unsqueeze(0)
    ahead = (scores > t) | ((scores == t) & (ids < target))
    rank = ahead.sum(dim=1) + 1
    # a masked (-inf) target is a miss whatever k is
    return torch.where(torch.isinf(t.squeeze(1)), torch.full_like(rank, MISS), rank)


def hr_ndcg(rank: torch.Tensor, k: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    hit = (rank <= k).float()
    ndcg = hit / torch.log2(rank.float() + 1)
    return hit, ndcg
