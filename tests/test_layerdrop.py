import re

import pytest

from iisan.training.layerdrop import SchemeError, authors_stride, paper_eq5_stride, scheme_layers


@pytest.mark.parametrize(
    "scheme,expected",
    [
        ("blocks6", [0, 2, 4, 6, 8, 10, 12]),  # the paper's default: 7 side blocks
        ("all", list(range(13))),  # w/o LayerDrop
        ("blocks12", list(range(13))),
        ("blocks2", [0, 6, 12]),
        ("blocks3", [0, 4, 8, 12]),
        ("blocks4", [0, 3, 6, 9, 12]),
        ("last", [12]),
    ],
)
def test_symmetric_schemes_12_layers(scheme, expected):
    assert scheme_layers(scheme, 12) == expected


def test_h0_can_be_left_out():
    assert scheme_layers("blocks6", 12, include_h0=False) == [2, 4, 6, 8, 10, 12]


def test_minilm_half():
    assert scheme_layers("blocks3", 6) == [0, 2, 4, 6]


@pytest.mark.parametrize(
    "layers,kept",
    [
        (12, [2, 4, 6, 8, 10, 12]),
        (24, [4, 8, 12, 16, 20, 24]),
        (28, [3, 8, 13, 18, 23, 28]),
        (32, [2, 8, 14, 20, 26, 32]),
        (80, [5, 20, 35, 50, 65, 80]),
    ],
)
def test_authors_stride_table(layers, kept):
    assert authors_stride(layers, 6) == kept


@pytest.mark.parametrize("layers,stride", [(24, 3), (28, 4), (32, 5), (80, 13)])
def test_paper_eq5_strides(layers, stride):
    kept = paper_eq5_stride(layers, 6)
    assert kept[-1] == layers and kept[1] - kept[0] == stride and len(kept) == 6


def test_inapplicable_scheme_names_both():
    with pytest.raises(SchemeError, match="'blocks5'.*12-layer"):
        scheme_layers("blocks5", 12)
    with pytest.raises(SchemeError, match="unknown LayerDrop scheme 'every3'"):
        scheme_layers("every3", 12)


@pytest.mark.parametrize(
    "scheme,layers,message",
    [
        (
            "blocks24",
            12,
            "LayerDrop scheme 'blocks24' cannot be applied to a 12-layer backbone: that backbone has only "
            "12 blocks; use blocks1, blocks2, blocks3, blocks4, blocks6 or blocks12",
        ),
        (
            "blocks5",
            12,
            "LayerDrop scheme 'blocks5' cannot be applied to a 12-layer backbone: 5 blocks cannot be evenly "
            "spaced over 12 layers (5 does not divide 12); use blocks1, blocks2, blocks3, blocks4, blocks6 or blocks12",
        ),
        (
            "blocks0",
            6,
            "LayerDrop scheme 'blocks0' cannot be applied to a 6-layer backbone: a scheme must keep at least "
            "1 block; use blocks1, blocks2, blocks3 or blocks6",
        ),
        (
            "stride13",
            12,
            "LayerDrop scheme 'stride13' cannot be applied to a 12-layer backbone: that backbone has only "
            "12 blocks; use stride1..stride12",
        ),
        (
            "eq5-0",
            24,
            "LayerDrop scheme 'eq5-0' cannot be applied to a 24-layer backbone: a scheme must keep at least "
            "1 block; use eq5-1..eq5-24",
        ),
        (
            "even_down12",
            12,
            "selection 'even_down12' needs at least 24 layers, the backbone has 12; use top, down or even_all",
        ),
        (
            "every3",
            12,
            "unknown LayerDrop scheme 'every3': for a 12-layer backbone use all, last, blocks<n> (blocks1, "
            "blocks2, blocks3, blocks4, blocks6 or blocks12), stride<n> or eq5-<n> (n = 1..12), "
            "or a selection (top, down or even_all)",
        ),
    ],
    ids=["blocks24", "blocks5", "blocks0", "stride13", "eq5-0", "even_down12", "every3"],
)
def test_scheme_errors_say_what_is_wrong(scheme, layers, message):
    with pytest.raises(SchemeError) as err:
        scheme_layers(scheme, layers)
    assert str(err.value) == message
    assert f"'{scheme}'" in message and re.search(rf"a {layers}-layer backbone|the backbone has {layers};", message)
    assert "must divide the layer count" not in message


@pytest.mark.parametrize("rule", [authors_stride, paper_eq5_stride])
def test_stride_rules_say_why(rule):
    with pytest.raises(SchemeError, match=r"^cannot keep 13 blocks of a 12-layer backbone: that backbone has only 12 blocks$"):
        rule(12, 13)


@pytest.mark.parametrize("name", ["down", "even_all"])
def test_a_selection_that_keeps_no_block_is_refused(name):
    with pytest.raises(SchemeError, match=rf"selection '{name}' keeps no block of a 1-layer backbone; use top"):
        scheme_layers(name, 1)
    assert scheme_layers("top", 1) == [0, 1]
