import pytest

from sparserun import patterns
from sparserun.patterns import Pattern, parse


@pytest.mark.parametrize("s, kind, fmt, text", [
    ("unstructured", "unstructured", "bitmask", "unstructured"),
    (" Unstructured ", "unstructured", "bitmask", "unstructured"),
    ("2:4", "nm", "semi24", "2:4"),
    ("4:8", "nm", "bitmask", "4:8"),
    ("1:2", "nm", "bitmask", "1:2"),
    ("31:32", "nm", "bitmask", "31:32"),
    ("16x16", "block", "bsr", "16x16"),
    ("32X32", "block", "bsr", "32x32"),
    ("64x64", "block", "bsr", "64x64"),
    ("128x128", "block", "bsr", "128x128"),
])
def test_parse_valid(s, kind, fmt, text):
    p = parse(s)
    assert p.kind == kind and p.format == fmt and str(p) == text
    assert parse(str(p)) == p  # str round-trips
    assert parse(p) is p


def test_fixed_sparsity():
    assert parse("2:4").fixed_sparsity == 0.5
    assert parse("1:4").fixed_sparsity == 0.75
    assert parse("32x32").fixed_sparsity is None
    assert parse("unstructured").fixed_sparsity is None
    assert (parse("2:4").n, parse("2:4").m) == (2, 4) and parse("64x64").block == 64


@pytest.mark.parametrize("bad", ["", "2:2", "4:2", "0:4", "2:33", "3:64", "2-4", "2:4:8", "32x16", "8x8",
                                 "256x256", "48x48", "x32", "dense", "structured", "2 : 4", None, 24,
                                 Pattern("nm", n=4, m=2), Pattern("block", block=7), Pattern("foo")])
def test_parse_invalid_lists_valid_forms(bad):
    with pytest.raises(ValueError) as e:
        parse(bad)
    msg = str(e.value)
    assert repr(bad) in msg
    for form in ('"unstructured"', '"N:M"', '"BxB"', "16, 32, 64, 128"):
        assert form in msg


def test_block_sizes_constant():
    assert patterns.BLOCK_SIZES == (16, 32, 64, 128)
    assert Pattern("block", block=32) == parse("32x32")
