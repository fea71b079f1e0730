"""Read TensorFlow v1 checkpoints ("tensor bundles") without TensorFlow.

The pretrained musicnn weights ship as TF1 checkpoints, and TensorFlow itself
cannot be installed next to Earmark (the musicnn package pins ancient numpy and
TensorFlow releases that do not exist for Python 3.11). The on-disk format is
small and stable, so we read it ourselves:

* ``<prefix>.index`` is an immutable sorted key/value table in the LevelDB
  "SSTable" layout: data blocks of prefix-compressed entries with restart points,
  an index block pointing at them, and a fixed 48-byte footer. The key ``""``
  holds a ``BundleHeaderProto``; every other key is a tensor name whose value is
  a ``BundleEntryProto`` (dtype, shape, shard, offset, size, CRC32C).
* ``<prefix>.data-00000-of-00001`` is the raw little-endian bytes of every
  tensor, back to back.

Only the subset TensorFlow actually writes for ordinary single-shard checkpoints
is accepted (uncompressed blocks, numeric dtypes, unpartitioned variables);
anything else raises :class:`CheckpointError` rather than being misread. Every
block checksum and every tensor checksum is verified, and the entries must tile
the data file exactly, so a truncated or tampered file cannot produce weights.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

TABLE_MAGIC = 0xDB4775248B80FB57  # kTableMagicNumber, little-endian uint64 at the end of the file
FOOTER_SIZE = 48  # two BlockHandles padded to 40 bytes + 8-byte magic
BLOCK_TRAILER_SIZE = 5  # 1 byte compression type + 4 bytes masked CRC32C
NO_COMPRESSION = 0
SNAPPY_COMPRESSION = 1

# tensorflow/core/framework/types.proto -> numpy, little-endian as TF writes them.
DTYPES = {
    1: np.dtype("<f4"),  # DT_FLOAT
    2: np.dtype("<f8"),  # DT_DOUBLE
    3: np.dtype("<i4"),  # DT_INT32
    4: np.dtype("u1"),  # DT_UINT8
    5: np.dtype("<i2"),  # DT_INT16
    6: np.dtype("i1"),  # DT_INT8
    9: np.dtype("<i8"),  # DT_INT64
    10: np.dtype("?"),  # DT_BOOL
    17: np.dtype("<u2"),  # DT_UINT16
    19: np.dtype("<f2"),  # DT_HALF
    22: np.dtype("<u4"),  # DT_UINT32
    23: np.dtype("<u8"),  # DT_UINT64
}


class CheckpointError(ValueError):
    """The files are not a checkpoint this reader can decode faithfully."""


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives in the data file, decoded from a BundleEntryProto."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    shard_id: int
    offset: int
    size: int
    crc32c: int  # masked, as stored


# --------------------------------------------------------------------------- CRC32C
# TensorFlow checksums blocks and tensors with CRC-32C (Castagnoli), which the
# standard library does not provide (zlib.crc32 is a different polynomial).

_CRC32C_POLY = 0x82F63B78  # reflected Castagnoli polynomial
_MASK_DELTA = 0xA282EAD8


def _crc32c_table() -> np.ndarray:
    """Byte-at-a-time lookup table for the reflected CRC-32C polynomial."""
    table = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        table = np.where(table & 1, (table >> 1) ^ np.uint32(_CRC32C_POLY), table >> 1).astype(np.uint32)
    return table


_TABLE = _crc32c_table()
_TABLE_LIST = [int(v) for v in _TABLE]
_LANE = 1024  # bytes per lane in the vectorised path


def _crc_bytes(state: int, data: bytes) -> int:
    """Advance a raw CRC register over ``data`` one byte at a time (short inputs)."""
    table = _TABLE_LIST
    for byte in data:
        state = table[(state ^ byte) & 0xFF] ^ (state >> 8)
    return state


def _zero_shift_tables(length: int) -> list[list[int]]:
    """Tables that advance a CRC register over ``length`` zero bytes in four lookups.

    The register update is linear over GF(2), so feeding zeros is a fixed 32x32
    bit matrix; we push the 32 basis vectors through it once and tabulate the
    result per input byte of the register.
    """
    basis = np.array([1 << i for i in range(32)], dtype=np.uint32)
    for _ in range(length):
        basis = _TABLE[basis & 0xFF] ^ (basis >> 8)
    images = [int(v) for v in basis]
    tables = []
    for k in range(4):
        table = [0] * 256
        for value in range(256):
            acc = 0
            for bit in range(8):
                if value >> bit & 1:
                    acc ^= images[8 * k + bit]
            table[value] = acc
        tables.append(table)
    return tables


_SHIFT_TABLES = None


def _crc_lanes(state: int, data: bytes) -> int:
    """Advance a raw CRC register over a long buffer using numpy.

    A Python byte loop runs at roughly 10 MB/s, too slow for tens of megabytes of
    weights. Instead the buffer is cut into equal lanes whose CRCs are computed
    side by side (one vectorised step per byte position), then chained:
    ``crc(s, A+B) = shift_|B|(crc(s, A)) ^ crc(0, B)`` by linearity.
    """
    global _SHIFT_TABLES
    if _SHIFT_TABLES is None:
        _SHIFT_TABLES = _zero_shift_tables(_LANE)
    t0, t1, t2, t3 = _SHIFT_TABLES
    n_lanes = len(data) // _LANE
    lanes = np.frombuffer(data, dtype=np.uint8, count=n_lanes * _LANE).reshape(n_lanes, _LANE).T.copy()
    regs = np.zeros(n_lanes, dtype=np.uint32)
    for column in lanes:
        regs = _TABLE[(regs ^ column) & 0xFF] ^ (regs >> 8)
    for lane_crc in regs.tolist():
        state = t0[state & 0xFF] ^ t1[state >> 8 & 0xFF] ^ t2[state >> 16 & 0xFF] ^ t3[state >> 24] ^ lane_crc
    return _crc_bytes(state, data[n_lanes * _LANE:])


def crc32c(data: bytes) -> int:
    """Standard CRC-32C of ``data`` (initial value and final XOR 0xFFFFFFFF)."""
    data = bytes(data)
    if len(data) < 16 * _LANE:
        return _crc_bytes(0xFFFFFFFF, data) ^ 0xFFFFFFFF
    return _crc_lanes(0xFFFFFFFF, data) ^ 0xFFFFFFFF


def mask_crc(crc: int) -> int:
    """LevelDB/TF "masked" CRC: stored CRCs are rotated and offset so that a CRC of
    data that itself contains CRCs does not degenerate."""
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


# --------------------------------------------------------------------------- protobuf
# The two messages we need are tiny; decoding the wire format by hand avoids a
# protobuf dependency and generated code.


def read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    """Decode a base-128 varint at ``pos``; return (value, position after it)."""
    result = shift = 0
    while True:
        if pos >= len(buf):
            raise CheckpointError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise CheckpointError("varint longer than 64 bits")


def iter_proto_fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """Yield (field number, value) for each field of a serialized protobuf message.

    Varints and fixed-width fields come back as ints, length-delimited fields as
    bytes; unknown fields are thus skipped naturally by the callers.
    """
    pos = 0
    while pos < len(buf):
        tag, pos = read_varint(buf, pos)
        field, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            value, pos = read_varint(buf, pos)
        elif wire_type == 1:
            value, pos = struct.unpack_from("<Q", buf, pos)[0], pos + 8
        elif wire_type == 2:
            length, pos = read_varint(buf, pos)
            value, pos = bytes(buf[pos:pos + length]), pos + length
        elif wire_type == 5:
            value, pos = struct.unpack_from("<I", buf, pos)[0], pos + 4
        else:
            raise CheckpointError(f"unsupported protobuf wire type {wire_type}")
        if pos > len(buf):
            raise CheckpointError("truncated protobuf field")
        yield field, value


def parse_shape(buf: bytes) -> tuple[int, ...]:
    """Decode a TensorShapeProto: repeated Dim{int64 size = 1} in field 2."""
    dims = []
    for field, value in iter_proto_fields(buf):
        if field == 2:
            size = dict(iter_proto_fields(value)).get(1, 0)
            if size >= 1 << 63:  # int64 stored as two's complement varint: -1 means unknown
                raise CheckpointError("checkpoint tensor has an unknown dimension")
            dims.append(size)
        elif field == 3 and value:
            raise CheckpointError("checkpoint tensor has unknown rank")
    return tuple(dims)


def parse_header(buf: bytes) -> tuple[int, int]:
    """Decode the BundleHeaderProto stored under key "": (num_shards, endianness)."""
    fields = dict(iter_proto_fields(buf))
    return fields.get(1, 0), fields.get(2, 0)


def parse_entry(name: str, buf: bytes) -> TensorEntry:
    """Decode a BundleEntryProto into a :class:`TensorEntry`.

    Fields: 1 dtype, 2 shape, 3 shard_id, 4 offset, 5 size, 6 crc32c (fixed32),
    7 slices (only for partitioned variables, which we refuse).
    """
    fields: dict[int, int | bytes] = {}
    for field, value in iter_proto_fields(buf):
        if field == 7:
            raise CheckpointError(f"tensor {name!r} is a partitioned variable (slices), not supported")
        fields[field] = value
    dtype_code = fields.get(1, 0)
    if dtype_code not in DTYPES:
        raise CheckpointError(f"tensor {name!r} has unsupported TensorFlow dtype code {dtype_code}")
    return TensorEntry(
        name=name,
        dtype=DTYPES[dtype_code],
        shape=parse_shape(fields.get(2, b"")),
        shard_id=fields.get(3, 0),
        offset=fields.get(4, 0),
        size=fields.get(5, 0),
        crc32c=fields.get(6, 0),
    )


# --------------------------------------------------------------------------- SSTable


def read_block_handle(buf: bytes, pos: int) -> tuple[tuple[int, int], int]:
    """Decode a BlockHandle (varint offset, varint size) at ``pos``."""
    offset, pos = read_varint(buf, pos)
    size, pos = read_varint(buf, pos)
    return (offset, size), pos


def parse_footer(table: bytes) -> tuple[tuple[int, int], tuple[int, int]]:
    """Return the (metaindex, index) block handles from the 48-byte footer.

    Checking the magic number first turns "this is not an index file at all"
    into a clear error instead of garbage offsets.
    """
    if len(table) < FOOTER_SIZE:
        raise CheckpointError("index file is shorter than a table footer")
    footer = table[-FOOTER_SIZE:]
    (magic,) = struct.unpack_from("<Q", footer, FOOTER_SIZE - 8)
    if magic != TABLE_MAGIC:
        raise CheckpointError("index file does not end with the table magic number")
    metaindex, pos = read_block_handle(footer, 0)
    index, _ = read_block_handle(footer, pos)
    return metaindex, index


def read_block(table: bytes, handle: tuple[int, int]) -> bytes:
    """Return a block's contents after checking its trailer (type and checksum).

    The CRC covers the contents plus the type byte. Snappy-compressed blocks are
    refused: TensorFlow never compresses bundle indexes, so one would mean a
    foreign file.
    """
    offset, size = handle
    end = offset + size
    if end + BLOCK_TRAILER_SIZE > len(table):
        raise CheckpointError("block handle points past the end of the index file")
    block_type = table[end]
    (stored_crc,) = struct.unpack_from("<I", table, end + 1)
    if mask_crc(crc32c(table[offset:end + 1])) != stored_crc:
        raise CheckpointError(f"index block at offset {offset} fails its checksum")
    if block_type == SNAPPY_COMPRESSION:
        raise CheckpointError("index block is snappy-compressed; only uncompressed tables are supported")
    if block_type != NO_COMPRESSION:
        raise CheckpointError(f"index block has unknown compression type {block_type}")
    return table[offset:end]


def read_restarts(block: bytes) -> tuple[list[int], int]:
    """Return (restart offsets, end of the entry area) from a block's tail.

    A block ends with uint32 restart offsets and their uint32 count; the entries
    occupy everything before that array.
    """
    if len(block) < 4:
        raise CheckpointError("block too short for its restart count")
    (count,) = struct.unpack_from("<I", block, len(block) - 4)
    entries_end = len(block) - 4 * (count + 1)
    if count == 0 or entries_end < 0:
        raise CheckpointError("block has an invalid restart array")
    restarts = list(struct.unpack_from(f"<{count}I", block, entries_end))
    return restarts, entries_end


def iter_block_entries(block: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Yield (key, value) pairs of a block, undoing the prefix compression.

    Each entry stores how many leading bytes it shares with the previous key;
    at restart points that count must be zero (they are where a reader may start
    a binary search), which we check to catch corrupt blocks.
    """
    restarts, entries_end = read_restarts(block)
    restart_set = set(restarts)
    pos, key = 0, b""
    while pos < entries_end:
        entry_start = pos
        shared, pos = read_varint(block, pos)
        non_shared, pos = read_varint(block, pos)
        value_len, pos = read_varint(block, pos)
        if entry_start in restart_set:
            restart_set.discard(entry_start)
            if shared != 0:
                raise CheckpointError("restart point entry shares a key prefix")
        if shared > len(key) or pos + non_shared + value_len > entries_end:
            raise CheckpointError("block entry overruns its block")
        key = key[:shared] + block[pos:pos + non_shared]
        pos += non_shared
        yield key, block[pos:pos + value_len]
        pos += value_len
    if restart_set:
        raise CheckpointError("restart points do not fall on entry boundaries")


def iter_table(table: bytes) -> Iterator[tuple[bytes, bytes]]:
    """Yield every (key, value) of an SSTable in key order, via its index block."""
    _, index_handle = parse_footer(table)
    previous = None
    for _, handle_bytes in iter_block_entries(read_block(table, index_handle)):
        handle, _ = read_block_handle(handle_bytes, 0)
        for key, value in iter_block_entries(read_block(table, handle)):
            if previous is not None and key <= previous:
                raise CheckpointError("index keys are not strictly sorted")
            previous = key
            yield key, value


# --------------------------------------------------------------------------- bundle


def read_entries(index: bytes) -> list[TensorEntry]:
    """Decode the header and all tensor entries from an ``.index`` file's bytes."""
    entries, header = [], None
    for key, value in iter_table(index):
        if key == b"":
            header = parse_header(value)
        else:
            entries.append(parse_entry(key.decode("utf-8"), value))
    if header is None:
        raise CheckpointError("index has no bundle header")
    num_shards, endianness = header
    if num_shards != 1:
        raise CheckpointError(f"checkpoint has {num_shards} data shards; only single-shard checkpoints are supported")
    if endianness != 0:
        raise CheckpointError("checkpoint was written big-endian; only little-endian is supported")
    return entries


def check_coverage(entries: list[TensorEntry], data_size: int) -> None:
    """Require the entries to tile the data file exactly, with no gap or overlap.

    TensorFlow writes tensors back to back, so anything else means the index and
    data file do not belong together (or one is truncated), and some tensor we
    return would silently be wrong.
    """
    position = 0
    for entry in sorted(entries, key=lambda e: e.offset):
        if entry.shard_id != 0:
            raise CheckpointError(f"tensor {entry.name!r} is in shard {entry.shard_id}, expected 0")
        expected = int(np.prod(entry.shape, dtype=np.int64)) * entry.dtype.itemsize
        if entry.size != expected:
            raise CheckpointError(f"tensor {entry.name!r} has {entry.size} bytes, its shape needs {expected}")
        if entry.offset != position:
            raise CheckpointError(f"tensor {entry.name!r} starts at {entry.offset}, expected {position}")
        position += entry.size
    if position != data_size:
        raise CheckpointError(f"entries cover {position} bytes of a {data_size}-byte data file")


def read_tensor(entry: TensorEntry, data: bytes) -> np.ndarray:
    """Copy one tensor out of the data file after checking its CRC32C."""
    raw = data[entry.offset:entry.offset + entry.size]
    if mask_crc(crc32c(raw)) != entry.crc32c:
        raise CheckpointError(f"tensor {entry.name!r} fails its checksum")
    return np.frombuffer(raw, dtype=entry.dtype).reshape(entry.shape).astype(entry.dtype.newbyteorder("="))


def read_checkpoint(index: bytes, data: bytes) -> dict[str, np.ndarray]:
    """Decode a whole checkpoint from the bytes of its index and data files.

    Returns tensor name -> numpy array (native byte order, own memory).
    Works on bytes so the installer can read straight out of a wheel (a zip)
    without extracting it.
    """
    entries = read_entries(bytes(index))
    data = bytes(data)
    check_coverage(entries, len(data))
    return {entry.name: read_tensor(entry, data) for entry in entries}


def read_checkpoint_files(prefix: str | Path) -> dict[str, np.ndarray]:
    """Read ``<prefix>.index`` and ``<prefix>.data-00000-of-00001`` from disk."""
    prefix = str(prefix)
    return read_checkpoint(Path(prefix + ".index").read_bytes(), Path(prefix + ".data-00000-of-00001").read_bytes())
