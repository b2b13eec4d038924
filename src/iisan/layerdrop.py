"""LayerDrop schemes: which backbone hidden states h[l] feed the side network (METHOD.md §3).

`h[0]` is the embedding output, `h[l]` (l >= 1) the output of block l.

Symmetric schemes (IISAN-VS) are named ``blocks{n}``: n evenly spaced blocks anchored at the
top layer, stride ``k = L // n``, i.e. ``{k, 2k, ..., L}`` (for 12 layers: 2 -> 6,12;
3 -> 4,8,12; 4 -> 3,6,9,12; 6 -> 2,4,...,12; 12 -> 1..12). ``all`` keeps every block.
``h[0]`` is prepended unless ``include_h0`` is false, so "6 blocks" means 7 side blocks.

The asymmetric (IISAN-VA) stride of the authors' code, ``k = (L - 1) // (n - 1)`` anchored at
the top, is :func:`authors_stride`; the paper's eq. 5 is :func:`paper_eq5_stride`.
"""

from __future__ import annotations

import re

_BLOCKS = re.compile(r"^blocks(\d+)$")


class SchemeError(ValueError):
    pass


def evenly_spaced(num_layers: int, n: int) -> list[int]:
    """n blocks anchored at the top with stride L // n (symmetric schemes)."""
    if n < 1 or n > num_layers:
        raise SchemeError(f"cannot keep {n} blocks of a {num_layers}-layer backbone")
    k = num_layers // n
    return [num_layers - k * (n - 1 - j) for j in range(n)]


def authors_stride(num_layers: int, n: int) -> list[int]:
    """Top-anchored stride k = floor((L - 1) / (n - 1)) of the authors' code."""
    if n < 1 or n > num_layers:
        raise SchemeError(f"cannot keep {n} blocks of a {num_layers}-layer backbone")
    if n == 1:
        return [num_layers]
    k = (num_layers - 1) // (n - 1)
    return [num_layers - k * (n - 1 - j) for j in range(n)]


def paper_eq5_stride(num_layers: int, n: int) -> list[int]:
    """Paper eq. 5: the largest k with L - k*n >= 1 (n = L_image / 2), anchored at the top."""
    if n < 1 or n > num_layers:
        raise SchemeError(f"cannot keep {n} blocks of a {num_layers}-layer backbone")
    k = max(1, (num_layers - 1) // n)
    return [num_layers - k * (n - 1 - j) for j in range(n)]


def scheme_layers(scheme: str, num_layers: int, include_h0: bool = True) -> list[int]:
    """Hidden-state indices (into h[0..L]) that scheme `scheme` uses for an L-layer backbone."""
    if scheme == "all":
        blocks = list(range(1, num_layers + 1))
    elif scheme == "last":
        blocks = [num_layers]
        include_h0 = False
    else:
        m = _BLOCKS.match(scheme)
        if not m:
            raise SchemeError(
                f"unknown LayerDrop scheme {scheme!r}: use 'all', 'last' or 'blocks<n>' (e.g. blocks6)"
            )
        n = int(m.group(1))
        if n < 1 or n > num_layers or num_layers % n:
            raise SchemeError(
                f"LayerDrop scheme {scheme!r} cannot be applied to a {num_layers}-layer backbone: "
                f"n={n} must divide the layer count"
            )
        blocks = evenly_spaced(num_layers, n)
    return ([0] if include_h0 else []) + blocks
