"""RecordIO framing, IRHeader packing, indexed access, typed errors, and a fuzz of the reader."""
from __future__ import annotations

import random
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.recordio import (
    MAGIC_BYTES,
    MAX_RECORD,
    IndexedRecordIO,
    IRHeader,
    RecordIO,
    RecordIOError,
    frame_record,
    map_file,
    pack_record,
    peek_header,
    read_frame,
    read_index,
    read_index_arrays,
    unpack_record,
)


def payloads() -> list[bytes]:
    rng = random.Random(3)
    out = [b"", b"a", b"ab", b"abc", b"abcd", b"abcde"]
    out.append(MAGIC_BYTES)  # the whole payload is the magic
    out.append(MAGIC_BYTES * 3)  # consecutive aligned magics: empty middle parts
    out.append(b"xyzw" + MAGIC_BYTES + b"tail!")  # aligned in the middle, odd tail
    out.append(b"xy" + MAGIC_BYTES + b"zw")  # unaligned: must not be split
    out.append(b"12345678" + MAGIC_BYTES)  # aligned at the very end
    out += [bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 300))) for _ in range(20)]
    return out


def test_frame_round_trip_and_padding():
    for p in payloads():
        framed = frame_record(p)
        assert len(framed) % 4 == 0
        got, end = read_frame(framed, 0)
        assert got == p and end == len(framed)


def test_aligned_magic_is_split_into_continuation_parts():
    p = b"xyzw" + MAGIC_BYTES + b"tail!"
    framed = frame_record(p)
    flags = []
    pos = 0
    while pos < len(framed):
        magic, lrec = struct.unpack_from("<II", framed, pos)
        length = lrec & (MAX_RECORD - 1)
        flags.append(lrec >> 29)
        pos += 8 + ((length + 3) & ~3)
    assert flags == [1, 3]
    assert frame_record(MAGIC_BYTES * 3).count(MAGIC_BYTES) == 4  # parts 1,2,2,3 and no magic in data
    # an unaligned magic stays inside a single flag-0 record
    assert struct.unpack_from("<I", frame_record(b"xy" + MAGIC_BYTES + b"zw"), 4)[0] >> 29 == 0


def test_record_size_limit():
    class Huge(bytes):
        def __len__(self):
            return MAX_RECORD

    with pytest.raises(RecordIOError, match="2\\^29"):
        frame_record(Huge())


def test_header_scalar_and_vector_labels():
    h = IRHeader(0, 7.0, 123, 45)
    got, img = unpack_record(pack_record(h, b"JPEG"))
    assert (got.flag, got.label, got.id, got.id2, img) == (0, 7.0, 123, 45, b"JPEG")
    vec = np.array([3, 1, 2], dtype=np.float32)
    got, img = unpack_record(pack_record(IRHeader(0, vec, 9, 8), b"IMG"))
    assert got.flag == 3 and np.array_equal(got.label, vec) and img == b"IMG"
    with pytest.raises(RecordIOError):
        unpack_record(b"short")
    with pytest.raises(RecordIOError, match="label values"):
        unpack_record(struct.pack("<IfQQ", 1000, 0.0, 0, 0))


def test_indexed_round_trip_and_scan(tmp_path):
    rec, idx = tmp_path / "a.rec", tmp_path / "a.idx"
    data = payloads()
    with IndexedRecordIO(idx, rec, "w") as w:
        for k, p in enumerate(data):
            w.write_idx(k * 10, p)
    r = IndexedRecordIO(idx, rec, "r")
    assert r.keys == [k * 10 for k in range(len(data))]
    for k, p in enumerate(data):
        assert r.read_idx(k * 10) == p
    with pytest.raises(KeyError):
        r.read_idx(1)
    r.close()
    with RecordIO(rec, "r") as seq:
        assert [p for _, p in seq.scan()] == data
        seq2 = RecordIO(rec, "r")
        assert [seq2.read() for _ in data] == data and seq2.read() is None
        seq2.close()
    keys, offsets = read_index(idx)
    assert keys[0] == 0 and offsets[0] == 0 and offsets == sorted(offsets)


def test_typed_errors(tmp_path):
    framed = frame_record(b"hello world")
    with pytest.raises(RecordIOError, match="bad magic"):
        read_frame(b"\0" * 4 + framed[4:], 0)
    with pytest.raises(RecordIOError, match="runs past"):
        read_frame(framed[:12], 0)
    with pytest.raises(RecordIOError, match="truncated"):
        read_frame(framed[:5], 0)
    bad_idx = tmp_path / "x.idx"
    bad_idx.write_text("1\tnotanumber\n")
    with pytest.raises(RecordIOError, match="non-integer"):
        read_index(bad_idx)


def test_peek_header_agrees_with_the_whole_record_or_declines():
    magic_label = np.frombuffer(MAGIC_BYTES, dtype="<f4")[0]  # a label value whose bytes are the magic
    headers = [IRHeader(0, 7.0, 1, 2), IRHeader(0, np.array([3, 1, 2], np.float32), 3, 4),
               IRHeader(0, np.array([5, magic_label, 6], np.float32), 5, 6),  # split inside the label
               IRHeader(0, 2.0, 7, 8)]
    images = [b"JPEG", b"", MAGIC_BYTES + b"img", b"xyzw" * 3 + MAGIC_BYTES]  # the last: split in the image
    buf = b""
    offsets = []
    for h, img in zip(headers, images):
        offsets.append(len(buf))
        buf += frame_record(pack_record(h, img))
    peeked = [peek_header(buf, off) for off in offsets]
    assert peeked[2] is None  # its first part ends before the label does
    for off, got in zip(offsets, peeked):
        if got is None:
            continue
        want, _ = unpack_record(read_frame(buf, off)[0])
        assert (got.flag, got.id, got.id2) == (want.flag, want.id, want.id2)
        assert np.array_equal(np.atleast_1d(got.label), np.atleast_1d(want.label))
        assert isinstance(got.label, float) == isinstance(want.label, float)
    # not the start of a record: a continuation part, a bad magic, past the end
    assert peek_header(buf, offsets[2] + 8 + 28) is None
    assert peek_header(b"\0" * 4 + buf[4:], 0) is None
    assert peek_header(buf, len(buf) - 4) is None


def test_map_file_maps_records_and_empty_files(tmp_path):
    rec = tmp_path / "a.rec"
    rec.write_bytes(frame_record(b"abc") + frame_record(b"defgh"))
    with map_file(rec) as buf:
        assert read_frame(buf, 0) == (b"abc", 8 + 4)
        assert read_frame(buf, 12)[0] == b"defgh"
    (tmp_path / "empty.rec").write_bytes(b"")
    with map_file(tmp_path / "empty.rec") as buf:
        assert len(buf) == 0
    with RecordIO(tmp_path / "empty.rec", "r") as r:
        assert r.read() is None and list(r.scan()) == []


def _scan_all(buf: bytes) -> int:
    """Read every frame of `buf`; return how many. Only RecordIOError may escape."""
    pos = n = 0
    while pos < len(buf):
        payload, nxt = read_frame(buf, pos)
        assert nxt > pos  # progress: no loop can hang
        try:
            unpack_record(payload)
        except RecordIOError:
            pass
        pos, n = nxt, n + 1
    return n


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=512))
def test_fuzz_random_bytes(buf):
    try:
        _scan_all(buf)
    except RecordIOError:
        pass


_VALID = b"".join(frame_record(pack_record(IRHeader(0, float(i), i, 0), p)) for i, p in enumerate(payloads()))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(_VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8),
       st.integers(0, len(_VALID)))
def test_fuzz_mutated_file(mutations, cut):
    buf = bytearray(_VALID)
    for pos, value in mutations:
        buf[pos] = value
    try:
        _scan_all(bytes(buf[:cut]))
    except RecordIOError:
        pass


@pytest.mark.parametrize("text, want", [
    (b"", ([], [])), (b"1\t2", ([1], [2])), (b"\n1\t2\r\n\n3 4\n", ([1, 3], [2, 4])),
    (b"%d\t5\n" % (2 ** 63 - 1), ([2 ** 63 - 1], [5])), (b"007\t0008\n", ([7], [8])),
])
def test_read_index_arrays_parses_int64_in_blocks(tmp_path, text, want):
    idx = tmp_path / "a.idx"
    idx.write_bytes(text)
    for block in (1, 3, 1 << 22):
        keys, offsets = read_index_arrays(idx, block=block)
        assert keys.dtype == offsets.dtype == np.int64
        assert (keys.tolist(), offsets.tolist()) == want


@pytest.mark.parametrize("line", [b"1\t%d" % 2 ** 63, b"1\t%d" % 2 ** 64, b"-1\t2", b"1\t2\t3", b"1", b"1\t\xff",
                                  b"1\t\xd9\xa3", b"1\t1e3"])
def test_read_index_arrays_refuses_what_is_not_two_int64(tmp_path, line):
    idx = tmp_path / "a.idx"
    idx.write_bytes(b"0\t0\n" + line + b"\n5\t6\n")
    with pytest.raises(RecordIOError, match=r"a\.idx:2"):
        read_index_arrays(idx)


def test_framing_errors_of_a_file_name_it(tmp_path):
    rec = tmp_path / "cut.rec"
    rec.write_bytes(frame_record(b"x" * 100)[:50])
    with RecordIO(rec, "r") as r, pytest.raises(RecordIOError, match="cut.rec"):
        r.read_at(0)
