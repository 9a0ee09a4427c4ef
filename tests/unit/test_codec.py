from __future__ import annotations

from collections import namedtuple

import numpy as np
import orjson
import pytest

from worker import codec
from worker.codec import Codec

Rec = namedtuple("Rec", "topic partition offset timestamp key value headers")
NAMES = ["a", "b", "c"]


def rec(value, headers=None, offset=0):
    return Rec("t", 0, offset, 1000 + offset, b"k", value, headers or [])


def test_json_forms_and_binary_decode_to_the_same_rows():
    row = [1.5, -2.0, 3.25]
    recs = [
        rec(orjson.dumps({"id": "x", "features": row, "ts": 5})),
        rec(orjson.dumps(row)),
        rec(orjson.dumps({"features": {"c": 3.25, "a": 1.5, "b": -2.0}})),
        rec(*codec.encode_float32(row)),
    ]
    d = Codec(NAMES).decode(recs)
    assert not d.rejected
    np.testing.assert_array_equal(d.rows, np.array([row] * 4, dtype=np.float32))
    assert d.ids == ["x", None, None, None]
    assert d.timestamps == [5, None, None, None]
    assert d.record_index.tolist() == [0, 1, 2, 3]
    assert d.row_index.tolist() == [-1, -1, -1, -1]


def test_multi_row_records_keep_their_row_positions():
    rows = np.arange(12, dtype=np.float32).reshape(4, 3)
    value, headers = codec.encode_float32_rows(rows)
    d = Codec(NAMES).decode([rec(orjson.dumps([9, 9, 9])), rec(value, headers, offset=1)])
    np.testing.assert_array_equal(d.rows[1:], rows)
    assert d.record_index.tolist() == [0, 1, 1, 1, 1]
    assert d.row_index.tolist() == [-1, 0, 1, 2, 3]


@pytest.mark.parametrize(
    "value,headers,code",
    [
        (None, None, codec.UNDECODABLE),
        (b"\xff\xfe", None, codec.UNDECODABLE),
        (b"{", None, codec.INVALID_JSON),
        (b"3", None, codec.BAD_SHAPE),
        (b'{"x": 1}', None, codec.BAD_SHAPE),
        (b"[1, 2]", None, codec.DIMENSION_MISMATCH),
        (b'[1, 2, "3"]', None, codec.BAD_TYPE),
        (b"[1, 2, true]", None, codec.BAD_TYPE),
        (b'{"features": [1, 2, 3], "id": [1]}', None, codec.BAD_TYPE),
        (b'{"features": [1, 2, 3], "ts": "now"}', None, codec.BAD_TYPE),
        (b'{"features": {"a": 1, "b": 2}}', None, codec.MISSING_FEATURES),
        (b'{"features": {"a": 1, "b": 2, "c": 3, "d": 4}}', None, codec.UNKNOWN_FEATURES),
        (b"[1, 2, 1e400]", None, codec.NON_FINITE),
        (b"[1, 2, 1e39]", None, codec.NON_FINITE),
        (b"[1, 2, 100000000000000000000000000000000000000000000000000]", None, codec.NON_FINITE),
        (b"\x00" * 11, [(codec.CONTENT_TYPE, codec.FLOAT32)], codec.DIMENSION_MISMATCH),
        (b"\x00" * 24, [(codec.CONTENT_TYPE, codec.FLOAT32)], codec.DIMENSION_MISMATCH),
        (b"\x00" * 20, [(codec.CONTENT_TYPE, codec.FLOAT32_ROWS)], codec.DIMENSION_MISMATCH),
        (b"[1,2,3]", [(codec.CONTENT_TYPE, b"text/csv")], codec.UNKNOWN_CONTENT_TYPE),
        (b"[" + b"1," * 600 + b"1]", None, codec.OVERSIZE),
    ],
)
def test_each_bad_record_is_rejected_with_its_code_and_neighbours_survive(value, headers, code):
    good = rec(b"[1, 2, 3]")
    bad = rec(value, headers, offset=1)
    d = Codec(NAMES, max_record_bytes=1000).decode([good, bad, rec(b"[4, 5, 6]", offset=2)])
    assert [r.code for r in d.rejected] == [code]
    assert d.rejected[0].record is bad and d.rejected[0].detail
    np.testing.assert_array_equal(d.rows, [[1, 2, 3], [4, 5, 6]])


def test_a_multi_row_record_with_a_nan_row_is_rejected_whole():
    rows = np.ones((3, 3), dtype=np.float32)
    rows[1, 2] = np.nan
    d = Codec(NAMES).decode([rec(*codec.encode_float32_rows(rows)), rec(b"[1,2,3]", offset=1)])
    assert [r.code for r in d.rejected] == [codec.NON_FINITE]
    assert len(d) == 1 and d.record_index.tolist() == [1]


def test_empty_batch():
    d = Codec(NAMES).decode([])
    assert d.rows.shape == (0, 3) and not d.rejected
