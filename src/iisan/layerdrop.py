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


SELECTIONS = ("top", "down", "even_all", "even_top12", "even_down12")


def selection(name: str, num_layers: int) -> list[int]:
    """Table VIII selections: top / down = upper / lower half of the blocks; even_all = every
    second block (h[2], h[4], ..., h[L]); even_top12 / even_down12 = every second block among
    the top / bottom 12 (for 24 layers: 14, 16, ..., 24 and 2, 4, ..., 12)."""
    L = num_layers
    if name == "top":
        return list(range(L // 2 + 1, L + 1))
    if name == "down":
        return list(range(1, L // 2 + 1))
    if name == "even_all":
        return list(range(2, L + 1, 2))
    if name in ("even_top12", "even_down12"):
        if L < 24:
            raise SchemeError(f"selection {name!r} needs at least 24 layers, the backbone has {L}")
        return list(range(L - 10, L + 1, 2)) if name == "even_top12" else list(range(2, 13, 2))
    raise SchemeError(f"unknown selection {name!r}")


_STRIDE = re.compile(r"^(stride|eq5-)(\d+)$")


def scheme_layers(scheme: str, num_layers: int, include_h0: bool = True) -> list[int]:
    """Hidden-state indices (into h[0..L]) that one tower's scheme uses for an L-layer backbone.

    ``all`` | ``last`` | ``blocks<n>`` (evenly spaced, stride L // n) | ``stride<n>`` (the
    authors' group LayerDrop: top-anchored stride (L-1) // (n-1)) | ``eq5-<n>`` (the paper's
    eq. 5) | a Table VIII selection (top, down, even_all, even_top12, even_down12)."""
    m = _STRIDE.match(scheme)
    if scheme == "all":
        blocks = list(range(1, num_layers + 1))
    elif scheme == "last":
        blocks = [num_layers]
        include_h0 = False
    elif scheme in SELECTIONS:
        blocks = selection(scheme, num_layers)
    elif m:
        n = int(m.group(2))
        try:
            blocks = (authors_stride if m.group(1) == "stride" else paper_eq5_stride)(num_layers, n)
        except SchemeError as err:
            raise SchemeError(f"LayerDrop scheme {scheme!r} cannot be applied to a {num_layers}-layer backbone: {err}") from None
    else:
        m = _BLOCKS.match(scheme)
        if not m:
            raise SchemeError(
                f"unknown LayerDrop scheme {scheme!r}: use all, last, blocks<n>, stride<n>, eq5-<n> "
                f"or one of {', '.join(SELECTIONS)}"
            )
        n = int(m.group(1))
        if n < 1 or n > num_layers or num_layers % n:
            raise SchemeError(
                f"LayerDrop scheme {scheme!r} cannot be applied to a {num_layers}-layer backbone: "
                f"n={n} must divide the layer count"
            )
        blocks = evenly_spaced(num_layers, n)
    return ([0] if include_h0 else []) + blocks


def tower_schemes(scheme: str, n_towers: int) -> list[str]:
    """A run's scheme names one scheme for every tower, or one per tower joined by '+'."""
    parts = scheme.split("+")
    if len(parts) == 1:
        return parts * n_towers
    if len(parts) != n_towers:
        raise SchemeError(f"scheme {scheme!r} names {len(parts)} towers, the experiment has {n_towers}")
    return parts
