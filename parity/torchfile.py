"""``torch.save``'s file format for a state_dict of numpy arrays, written without importing torch.

A JAX run ends by exporting ``model.pt``; importing torch only to write it costs ~3.8 s of the
~40 s LeNet run (2-core CPU). The layout is torch 2.x's zip archive as
``torch.save`` writes it (records listed below, storages 64-byte aligned so ``mmap=True`` works),
and the pickle uses only what ``torch.load(weights_only=True)`` accepts.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import struct
import zipfile
from collections.abc import Mapping

import numpy as np

# numpy dtype -> the storage class torch pickles for it
STORAGES = {np.dtype(k): v for k, v in {
    "float32": "FloatStorage", "float64": "DoubleStorage", "float16": "HalfStorage",
    "int64": "LongStorage", "int32": "IntStorage", "int16": "ShortStorage", "int8": "CharStorage",
    "uint8": "ByteStorage", "bool": "BoolStorage"}.items()}
ALIGN = 64  # torch's .storage_alignment
ARCHIVE = "archive"  # torch.save's top folder when writing to a buffer


def _pickle(entries: list[tuple[str, str, tuple[int, ...], int]]) -> bytes:
    """Protocol-2 pickle of an OrderedDict of tensors, opcode for opcode as torch.save builds it
    (without the memo): each tensor is ``_rebuild_tensor_v2(storage, 0, size, stride, False,
    OrderedDict())`` with its storage a persistent id ``('storage', Storage, key, 'cpu', numel)``."""
    out = bytearray(pickle.PROTO + b"\x02")

    def glob(module: str, name: str) -> None:
        out.extend(pickle.GLOBAL + f"{module}\n{name}\n".encode())

    def text(s: str) -> None:
        b = s.encode()
        out.extend(pickle.BINUNICODE + struct.pack("<I", len(b)) + b)

    def integer(i: int) -> None:
        if 0 <= i < 2**31:
            out.extend(pickle.BININT + struct.pack("<i", i))
        else:
            b = pickle.encode_long(i)
            out.extend(pickle.LONG1 + bytes([len(b)]) + b)

    def ints(values: tuple[int, ...]) -> None:
        out.extend(pickle.MARK)
        for v in values:
            integer(v)
        out.extend(pickle.TUPLE)

    def empty_ordered_dict() -> None:
        glob("collections", "OrderedDict")
        out.extend(pickle.EMPTY_TUPLE + pickle.REDUCE)

    empty_ordered_dict()
    out.extend(pickle.MARK)
    for key, (name, storage, shape, numel) in enumerate(entries):
        text(name)
        glob("torch._utils", "_rebuild_tensor_v2")
        out.extend(pickle.MARK + pickle.MARK)
        text("storage")
        glob("torch", storage)
        text(str(key))
        text("cpu")
        integer(numel)
        out.extend(pickle.TUPLE + pickle.BINPERSID)
        integer(0)  # storage offset
        ints(shape)
        ints(tuple(int(np.prod(shape[i + 1:], dtype=np.int64)) for i in range(len(shape))))
        out.extend(pickle.NEWFALSE)  # requires_grad
        empty_ordered_dict()  # backward hooks
        out.extend(pickle.TUPLE + pickle.REDUCE)
    out.extend(pickle.SETITEMS + pickle.STOP)
    return bytes(out)


def _write_aligned(z: zipfile.ZipFile, buf: io.BytesIO, name: str, data: bytes) -> None:
    """A stored (uncompressed) record whose data starts at a multiple of ALIGN in the file."""
    info = zipfile.ZipInfo(f"{ARCHIVE}/{name}", date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    start = buf.tell() + 30 + len(info.filename.encode()) + 4  # local header, name, extra header
    info.extra = b"FB" + struct.pack("<H", -start % ALIGN) + b"Z" * (-start % ALIGN)
    z.writestr(info, data)


def torch_save_bytes(state_dict: Mapping[str, np.ndarray]) -> bytes:
    """The bytes ``torch.save(OrderedDict((k, torch.from_numpy(v)) ...))`` would write, give or
    take zip padding and the random serialization id (here a hash of the content, so equal weights
    give equal files)."""
    arrays = [(k, np.asarray(v, order="C")) for k, v in state_dict.items()]  # 0-d stays 0-d
    for k, a in arrays:
        if a.dtype not in STORAGES:
            raise TypeError(f"{k}: no torch storage for dtype {a.dtype}")
    entries = [(k, STORAGES[a.dtype], tuple(int(s) for s in a.shape), int(a.size)) for k, a in arrays]
    data_pkl = _pickle(entries)
    raw = [a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes() for _, a in arrays]
    digest = hashlib.sha1(data_pkl)
    for r in raw:
        digest.update(r)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        _write_aligned(z, buf, "data.pkl", data_pkl)
        _write_aligned(z, buf, ".format_version", b"1")
        _write_aligned(z, buf, ".storage_alignment", str(ALIGN).encode())
        _write_aligned(z, buf, "byteorder", b"little")
        for key, r in enumerate(raw):
            _write_aligned(z, buf, f"data/{key}", r)
        _write_aligned(z, buf, "version", b"3\n")
        _write_aligned(z, buf, ".data/serialization_id", str(int(digest.hexdigest(), 16))[:40].encode())
    return buf.getvalue()
