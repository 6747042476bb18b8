"""scripts/store_sectors.py: the sector model on layouts worked out by hand, and the store list
it matches against the TTGIR (the compile itself needs Triton's sm_90 backend: left to the
script)."""

from __future__ import annotations

import itertools

import pytest

from polartensor.config import get_preset


@pytest.fixture
def ss(load_script):
    return load_script("store_sectors")


def test_down_the_rows_is_one_sector_per_row_per_word(ss):
    # [64 rows, 16 words] of 2 bytes, records 46 bytes apart: lanes down the rows (32 rows a
    # warp, two warps along the rows and two along the words): every word of a row is its own
    # instruction, so 16 sectors per row
    layout = ([1, 1], [32, 1], [2, 2], [0, 1])
    got = ss.sectors_per_row((64, 16), layout, lambda i: i[0] * 46 + 2 * i[1], 64, 2)
    assert got == 16


def test_along_the_record_touches_a_row_once_or_twice(ss):
    # the same store with lanes along the words (2 rows x 16 words a warp): a row's 32
    # bytes span one or two sectors, depending on where the row starts
    layout = ([1, 1], [2, 16], [4, 1], [1, 0])
    got = ss.sectors_per_row((64, 16), layout, lambda i: i[0] * 46 + 2 * i[1], 64, 2)
    assert 1 < got < 2
    # rows starting on sector boundaries: exactly one sector per row
    assert ss.sectors_per_row((64, 16), layout, lambda i: i[0] * 64 + 2 * i[1], 64, 2) == 1


def test_vectors_and_duplicates_count_once(ss):
    # four 2-byte elements per thread along the row form one vector store; a layout wider
    # than the tensor (dim 1: 2 x 2 = 4 > 2) leaves duplicate lanes, which are masked
    vec = ([1, 4], [16, 2], [4, 1], [1, 0])
    got = ss.sectors_per_row((64, 8), vec, lambda i: i[0] * 16 + 2 * i[1], 64, 2)
    assert got == 0.5  # 16 rows x 16 bytes per instruction: 8 sectors
    dup = ([1, 1], [16, 2], [4, 1], [1, 0])
    assert ss.sectors_per_row((64, 1), dup, lambda i: i[0] * 32, 64, 2) == 1


def test_expected_stores_cover_each_record_byte_once(ss):
    """The store list the model matches to the TTGIR writes every code byte of a record
    exactly once, for every store form, at full-depth and fixed-depth presets."""
    for preset, d in [("paper", 128), ("paper", 64), ("polar-3", 128), ("polar-4", 64),
                      ("polar-4", 128)]:
        cfg = get_preset(preset, head_dim=d)
        rb = cfg.record_bytes(d)
        for store in ("strided", "record", "whole", "record16"):
            stores = ss.expected_stores(cfg, d, 4, store, True, rb % 2 == 0)
            hits = [0] * (4 * rb)
            for label, _, shape, addr in stores:
                if label == "radii":
                    continue
                size = 2 if "16-bit" in label else 1
                for idx in itertools.product(*(range(s) for s in shape)):
                    a = addr(idx)
                    if a is not None:
                        for k in range(size):
                            hits[a + k] += 1
            assert hits == [1] * (4 * rb), (preset, d, store)
