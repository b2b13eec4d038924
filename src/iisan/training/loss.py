"""In-batch debiased cross-entropy (paper eqs. 6-7, docs/method.md §6)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

MASK_VALUE = -1e4


def inbatch_debiased_ce(
    user: torch.Tensor,  # (B, T, D) user-encoder outputs for the T = S-1 input slots
    items: torch.Tensor,  # (B, S, D) item embeddings of all S slots
    ids: torch.Tensor,  # (B, S) item ids, 0 = padding
    log_pop: torch.Tensor,  # (N+1,) log popularity, log_pop[0] = 0
    first_row: int = 0,
) -> torch.Tensor:
    """logits = U E^T - log p[ids]; padding columns and every column whose item occurs in the
    row's user window (except the positive, slot j+1 of the same user) are set to -1e4; mean
    cross-entropy over rows whose input slot is a real item.

    `user` may hold the b users first_row..first_row+b-1 of the batch only (a run on several
    processes, iisan.training.distributed): their rows' share of the loss, the sum of their
    cross-entropies over the whole batch's real input slots."""
    B, S, D = items.shape
    T = S - 1
    b = user.shape[0]
    U = user.reshape(b * T, D)
    E = items.reshape(B * S, D)
    col_ids = ids.reshape(B * S)  # (B*S,)
    # the logits, the -1e4 masking and the softmax in fp32 (fp64 inputs stay fp64), under autocast
    # too: the inputs are cast before the matmul, which runs with autocast off (docs/method.md §6)
    dt = torch.promote_types(torch.promote_types(U.dtype, E.dtype), torch.float32)
    with torch.autocast(U.device.type, enabled=False):
        logits = U.to(dt) @ E.to(dt).T - log_pop[col_ids].to(dt)  # (B*T, B*S)
    # column c is in user i's window if its item occurs among user i's S ids
    rows = ids[first_row : first_row + b]  # (b, S): the windows of these users
    in_window = (rows.unsqueeze(2) == col_ids.view(1, 1, -1)).any(dim=1)  # (b, B*S)
    masked = in_window.repeat_interleave(T, dim=0) | (col_ids == 0).unsqueeze(0)  # (b*T, B*S)
    # positive column of row (i, j) is slot j+1 of user i
    users = torch.arange(first_row, first_row + b, device=ids.device)
    pos = (users.unsqueeze(1) * S + torch.arange(1, S, device=ids.device)).reshape(-1)
    is_pos = torch.arange(B * S, device=ids.device).unsqueeze(0) == pos.unsqueeze(1)  # (b*T, B*S)
    masked = masked & ~is_pos
    logits = logits.masked_fill(masked, MASK_VALUE)
    valid = (rows[:, :-1] != 0).reshape(-1).float()  # real input => real target (left padding)
    every = (ids[:, :-1] != 0).sum().float() if b < B else valid.sum()  # the batch's real input slots
    ce = F.cross_entropy(logits, pos, reduction="none")
    return (ce * valid).sum() / every.clamp_min(1.0)
