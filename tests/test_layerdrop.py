import pytest

from iisan.layerdrop import SchemeError, authors_stride, paper_eq5_stride, scheme_layers


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
