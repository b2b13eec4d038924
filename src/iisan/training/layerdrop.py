"""LayerDrop schemes: which backbone hidden states h[l] feed the side network (docs/method.md §3).

`h[0]` is the embedding output, `h[l]` (l >= 1) the output of block l.

Symmetric schemes (IISAN-VS) are named ``blocks{n}``: n evenly spaced blocks anchored at the
top layer, stride ``k = L // n``, i.e. ``{k, 2k, ..., L}`` (for 12 layers: 2 -> 6,12;
3 -> 4,8,12; 4 -> 3,6,9,12; 6 -> 2,4,...,12; 12 -> 1..12). ``all`` keeps every block.
``h[0]`` is prepended unless ``include_h0`` is false, so "6 blocks" means 7 side blocks.

The asymmetric (IISAN-VA) stride of the authors' code, ``k = (L - 1) // (n - 1)`` anchored at
the top, is :func:`authors_stride`; the paper's eq. 5 is :func:`paper_eq5_stride`.

Several names can keep the same blocks (``stride6`` and ``blocks6`` on 24 layers, ``blocks6``
and ``even_all`` on 12, ``blocks12`` and ``all`` on 12): :func:`canonical_name` picks one name
per layer set, :func:`canonical_scheme` one name per run, which names its folder and its cache.
"""

from __future__ import annotations

import re

_BLOCKS = re.compile(r"^blocks(\d+)$")


class SchemeError(ValueError):
    pass


def _count_problem(n: int, num_layers: int) -> str | None:
    """Why n blocks cannot be kept from an L-layer backbone (None if they can): every scheme
    keeps at least one block and no more blocks than the backbone has."""
    if n < 1:
        return "a scheme must keep at least 1 block"
    if n > num_layers:
        return f"that backbone has only {num_layers} blocks"
    return None


def _check_count(n: int, num_layers: int) -> None:
    """Raise SchemeError unless 1 <= n <= L (shared by the three stride rules)."""
    problem = _count_problem(n, num_layers)
    if problem:
        raise SchemeError(f"cannot keep {n} blocks of a {num_layers}-layer backbone: {problem}")


def evenly_spaced(num_layers: int, n: int) -> list[int]:
    """n blocks anchored at the top with stride L // n (symmetric schemes)."""
    _check_count(n, num_layers)
    k = num_layers // n
    return [num_layers - k * (n - 1 - j) for j in range(n)]


def authors_stride(num_layers: int, n: int) -> list[int]:
    """Top-anchored stride k = floor((L - 1) / (n - 1)) of the authors' code."""
    _check_count(n, num_layers)
    if n == 1:
        return [num_layers]
    k = (num_layers - 1) // (n - 1)
    return [num_layers - k * (n - 1 - j) for j in range(n)]


def paper_eq5_stride(num_layers: int, n: int) -> list[int]:
    """Paper eq. 5: the largest k with L - k*n >= 1 (n = L_image / 2), anchored at the top."""
    _check_count(n, num_layers)
    k = max(1, (num_layers - 1) // n)
    return [num_layers - k * (n - 1 - j) for j in range(n)]


SELECTIONS = ("top", "down", "even_all", "even_top12", "even_down12")


def selection(name: str, num_layers: int) -> list[int]:
    """Table VIII selections: top / down = upper / lower half of the blocks; even_all = every
    second block (h[2], h[4], ..., h[L]); even_top12 / even_down12 = every second block among
    the top / bottom 12 (for 24 layers: 14, 16, ..., 24 and 2, 4, ..., 12)."""
    L = num_layers
    if name in ("down", "even_all") and L < 2:
        raise SchemeError(f"selection {name!r} keeps no block of a {L}-layer backbone; use {_or(valid_selections(L))}")
    if name == "top":
        return list(range(L // 2 + 1, L + 1))
    if name == "down":
        return list(range(1, L // 2 + 1))
    if name == "even_all":
        return list(range(2, L + 1, 2))
    if name in ("even_top12", "even_down12"):
        if L < 24:
            raise SchemeError(
                f"selection {name!r} needs at least 24 layers, the backbone has {L}; "
                f"use {_or(valid_selections(L))}"
            )
        return list(range(L - 10, L + 1, 2)) if name == "even_top12" else list(range(2, 13, 2))
    raise SchemeError(f"unknown selection {name!r}: for a {L}-layer backbone use {_or(valid_selections(L))}")


def valid_selections(num_layers: int) -> list[str]:
    """The Table VIII selections an L-layer backbone allows (the *12 ones need 24 layers; down
    and even_all keep no block of a 1-layer backbone)."""
    return [s for s in SELECTIONS if (num_layers >= 24 or not s.endswith("12"))
            and (num_layers >= 2 or s in ("top",))]


def valid_blocks(num_layers: int) -> list[str]:
    """The blocks<n> schemes an L-layer backbone allows: n must divide L so that the kept
    blocks are evenly spaced over the whole depth."""
    return [f"blocks{n}" for n in range(1, num_layers + 1) if num_layers % n == 0]


def _or(names: list[str]) -> str:
    """'a, b or c' for an error message."""
    if len(names) < 2:
        return names[0] if names else "nothing (the backbone has no layers)"
    return f"{', '.join(names[:-1])} or {names[-1]}"


def _inapplicable(scheme: str, num_layers: int, problem: str, valid: list[str]) -> SchemeError:
    """The error for a well-formed scheme that this backbone cannot use: what is wrong and
    which values of the same kind would work."""
    return SchemeError(
        f"LayerDrop scheme {scheme!r} cannot be applied to a {num_layers}-layer backbone: "
        f"{problem}; use {_or(valid)}"
    )


_STRIDE = re.compile(r"^(stride|eq5-)(\d+)$")


def scheme_layers(scheme: str, num_layers: int, include_h0: bool = True, output: int | None = None) -> list[int]:
    """Hidden-state indices (into h[0..L]) that one tower's scheme uses for an L-layer backbone.

    ``all`` | ``last`` (the output state: `output`, from `iisan.encoders.backbones.output_layer`, else
    h[L]) | ``blocks<n>`` (evenly spaced, stride L // n) | ``stride<n>`` (the
    authors' group LayerDrop: top-anchored stride (L-1) // (n-1)) | ``eq5-<n>`` (the paper's
    eq. 5) | a Table VIII selection (top, down, even_all, even_top12, even_down12)."""
    m = _STRIDE.match(scheme)
    if scheme == "all":
        blocks = list(range(1, num_layers + 1))
    elif scheme == "last":
        blocks = [num_layers if output is None else output]
        include_h0 = False
    elif scheme in SELECTIONS:
        blocks = selection(scheme, num_layers)
    elif m:
        prefix, n = m.group(1), int(m.group(2))
        problem = _count_problem(n, num_layers)
        if problem:
            raise _inapplicable(scheme, num_layers, problem, [f"{prefix}1..{prefix}{num_layers}"])
        blocks = (authors_stride if prefix == "stride" else paper_eq5_stride)(num_layers, n)
    else:
        m = _BLOCKS.match(scheme)
        if not m:
            raise SchemeError(
                f"unknown LayerDrop scheme {scheme!r}: for a {num_layers}-layer backbone use all, last, "
                f"blocks<n> ({_or(valid_blocks(num_layers))}), stride<n> or eq5-<n> (n = 1..{num_layers}), "
                f"or a selection ({_or(valid_selections(num_layers))})"
            )
        n = int(m.group(1))
        problem = _count_problem(n, num_layers)
        if problem is None and num_layers % n:
            problem = f"{n} blocks cannot be evenly spaced over {num_layers} layers ({n} does not divide {num_layers})"
        if problem:
            raise _inapplicable(scheme, num_layers, problem, valid_blocks(num_layers))
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


def canonical_name(scheme: str, num_layers: int) -> str:
    """The one name of the blocks that `scheme` keeps of an L-layer backbone, by a fixed rule:
    ``all`` if it keeps every block; else ``blocks<n>`` if that keeps the same blocks; else the
    first Table VIII selection (in the order of SELECTIONS) that does; else ``stride<n>``; else
    ``eq5-<n>`` (n: the blocks kept). ``last`` stays ``last``. A scheme the backbone cannot use
    raises SchemeError (as `scheme_layers`). Canonical names are their own canonical name."""
    if scheme == "last":
        return scheme
    kept = scheme_layers(scheme, num_layers, include_h0=False)
    n = len(kept)
    candidates = ["all", *([f"blocks{n}"] if num_layers % n == 0 else []), *valid_selections(num_layers), f"stride{n}", f"eq5-{n}"]
    for name in candidates:
        try:
            if scheme_layers(name, num_layers, include_h0=False) == kept:
                return name
        except SchemeError:
            continue
    return scheme


def canonical_scheme(scheme: str, layer_counts: list[int]) -> str:
    """A run's scheme named by what it keeps: each tower's `canonical_name` (its backbone has
    layer_counts[i] layers), one name when every tower's is the same, else joined by '+'.
    Without towers (ID models) the scheme is returned as it is."""
    if not layer_counts:
        return scheme
    names = [canonical_name(s, n) for s, n in zip(tower_schemes(scheme, len(layer_counts)), layer_counts)]
    return names[0] if len(set(names)) == 1 else "+".join(names)
