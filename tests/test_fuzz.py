"""Fuzzing the readers of untrusted files, as trusted file formats are fuzzed: random bytes,
truncations, flipped bits and overwritten bytes of small valid files (LeNet, 44k parameters).

``parity.read_weights`` raises WeightsFileError or reads; what a read may return depends on the
format. torch's zip files carry a CRC-32 per record, so a read is the original exactly. Legacy
torch pickles and safetensors files carry no checksum of their data: a damaged byte in a tensor's
data changes that element only; damage elsewhere (the pickle, the JSON header) reads the original,
or a state_dict that the strict conversion refuses (a name or shape changed), or, in a legacy
pickle, one tensor re-viewed on its storage (a changed stride or offset: nothing can tell).
``flaxnets.checkpoint.load`` raises CheckpointError or returns exactly the arrays and meta saved.
Nothing else is raised, no example hangs, and no pickled code runs.
"""

from __future__ import annotations

import contextlib
import faulthandler
import itertools
import os
import pickle
import resource
import shutil
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import flaxnets
import torch_ref
from flaxnets import checkpoint as C
from parity.convert import StateDictMismatchError, check_state_dict
from parity.files import WeightsFileError, read_weights
from parity.torchfile import _pickle as torch_pickle
from scripts.convert import main as convert_main

NET = "lenet"
FORMATS = ("zip", "legacy", "safetensors")
HANG_S = 120  # an example still running after this long is a hang: the run stops with its traceback
FUZZ = settings(derandomize=True, database=None, deadline=5000,  # ms per example
                suppress_health_check=[HealthCheck.too_slow])
CAST = "cast 10 float16 tensors to float32 (the net's parameters are float32)"


@contextlib.contextmanager
def time_bound() -> Iterator[None]:
    """Stop the whole run, with every thread's traceback, if the block takes over HANG_S: a hang
    in C++ (torch, tensorstore) that no Python exception could interrupt still ends."""
    faulthandler.dump_traceback_later(HANG_S, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


class Scratch:
    """A fresh file name per example under one module-wide directory."""

    def __init__(self, root: Path):
        self.root, self.count = root, itertools.count()

    def write(self, data: bytes, suffix: str) -> Path:
        path = self.root / f"{next(self.count)}{suffix}"
        path.write_bytes(data)
        return path


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Scratch:
    return Scratch(tmp_path_factory.mktemp("fuzz"))


def lenet_state_dict() -> OrderedDict[str, torch.Tensor]:
    """The torch LeNet's state_dict with seeded random weights."""
    torch.manual_seed(0)
    return torch_ref.create(NET).state_dict()


class Valid:
    """A valid weights file of one format: its bytes, what read_weights reads from it, and where
    each tensor's raw bytes lie in it."""

    def __init__(self, fmt: str, data: bytes, sd: OrderedDict[str, np.ndarray]):
        self.fmt, self.data, self.sd = fmt, data, sd
        self.suffix = ".safetensors" if fmt == "safetensors" else ".pt"
        self.spans = {}
        for k, a in sd.items():  # random floats: each tensor's bytes occur once in the file
            start = data.find(a.tobytes())
            assert start > 0 and data.find(a.tobytes(), start + 1) < 0, k
            self.spans[k] = (start, start + a.nbytes)
        self.data_start = min(s for s, _ in self.spans.values())


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> dict[str, Valid]:
    root = tmp_path_factory.mktemp("valid")
    sd = lenet_state_dict()
    torch.save(sd, root / "zip.pt")
    torch.save(sd, root / "legacy.pt", _use_new_zipfile_serialization=False)
    save_file(dict(sd), root / "m.safetensors")
    paths = {"zip": root / "zip.pt", "legacy": root / "legacy.pt", "safetensors": root / "m.safetensors"}
    out = {}
    for fmt, path in paths.items():
        read = read_weights(path, NET).state_dict
        assert sorted(read) == sorted(sd) and all(np.array_equal(read[k], v.numpy()) for k, v in sd.items())
        out[fmt] = Valid(fmt, path.read_bytes(), read)
    return out


def assert_read_is_explicable(v: Valid, got: OrderedDict[str, np.ndarray], first: int, last: int) -> None:
    """What a successful read of ``v``'s bytes damaged in ``[first, last]`` may return (module doc)."""
    assert all(isinstance(k, str) and isinstance(a, np.ndarray) for k, a in got.items())
    if v.fmt == "zip":  # checksummed: exactly the original
        assert list(got) == list(v.sd) and all(got[k].dtype == a.dtype and got[k].shape == a.shape
                                               and got[k].tobytes() == a.tobytes() for k, a in v.sd.items())
        return
    if list(got) != list(v.sd) or any((got[k].shape, got[k].dtype) != (a.shape, a.dtype)
                                      for k, a in v.sd.items()):
        with pytest.raises(StateDictMismatchError):  # a name or shape changed: the strict conversion refuses
            check_state_dict({k: a.shape for k, a in v.sd.items()}, got)
        return
    unexplained = []
    for k, a in v.sd.items():
        size = a.itemsize
        elements = (x.ravel().view(np.uint8).reshape(-1, size) for x in (got[k], a))
        differ = set(np.flatnonzero(np.not_equal(*elements).any(axis=1)))
        s, e = v.spans[k]  # the damaged bytes of this tensor's data may change their elements
        damaged = set()
        if s <= last and first < e:
            damaged = set(range((max(first, s) - s) // size, (min(last, e - 1) - s) // size + 1))
        if not differ <= damaged:
            unexplained.append(k)
    if unexplained:
        in_data = any(s <= first and last < e for s, e in v.spans.values())
        # a legacy pickle's changed stride or storage offset re-views one tensor: nothing can tell
        assert v.fmt == "legacy" and not in_data and len(unexplained) == 1, (unexplained, first, last)


def read_or_refuse(path: Path) -> OrderedDict[str, np.ndarray] | None:
    """read_weights' state_dict, or None where it raised WeightsFileError with a one-line message
    naming the file; any other exception fails the test."""
    try:
        return read_weights(path, NET).state_dict
    except WeightsFileError as e:
        assert str(path) in str(e) and "\n" not in str(e), str(e)
        return None


# --------------------------------------------------------------------------- weights files
MAGIC = st.sampled_from([b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19."])
SAFETENSORS_LIKE = st.builds(lambda n, body: struct.pack("<Q", n) + b"{" + body,
                             st.integers(0, 2**64 - 1), st.binary(max_size=512))


@settings(FUZZ, max_examples=150)
@given(data=st.one_of(st.builds(bytes.__add__, MAGIC, st.binary(max_size=2048)), SAFETENSORS_LIKE))
def test_random_bytes_are_refused(data, scratch):
    with time_bound():
        assert read_or_refuse(scratch.write(data, ".pt")) is None


TRUNCATIONS = ("empty", "1 byte", "a few bytes", "mid-header", "mid-data", "all but one byte")


@settings(FUZZ, max_examples=90)
@given(fmt=st.sampled_from(FORMATS), where=st.sampled_from(TRUNCATIONS), draw=st.data())
def test_a_truncated_file_is_refused(fmt, where, draw, valid, scratch):
    v = valid[fmt]
    n = len(v.data)
    length = {"empty": st.just(0), "1 byte": st.just(1), "a few bytes": st.integers(2, 16),
              "mid-header": st.integers(17, v.data_start), "mid-data": st.integers(v.data_start, n - 2),
              "all but one byte": st.just(n - 1)}[where]
    cut = draw.draw(length, label="length")
    with time_bound():
        assert read_or_refuse(scratch.write(v.data[:cut], v.suffix)) is None


@settings(FUZZ, max_examples=450)
@given(fmt=st.sampled_from(FORMATS), how=st.sampled_from(["flip", "overwrite", "zero a run"]),
       in_header=st.booleans(), draw=st.data())
def test_a_damaged_file_reads_exactly_or_explicably_or_is_refused(fmt, how, in_header, draw, valid, scratch):
    """Half the examples damage the header/pickle region (where the parsers work), half anywhere."""
    v = valid[fmt]
    data = bytearray(v.data)
    first = draw.draw(st.integers(0, (v.data_start + 64 if in_header else len(data)) - 1), label="at")
    if how == "flip":
        data[first] ^= 1 << draw.draw(st.integers(0, 7), label="bit")
        last = first
    elif how == "overwrite":
        data[first] = draw.draw(st.integers(0, 255).filter(lambda b: b != data[first]), label="byte")
        last = first
    else:
        last = min(len(data), first + draw.draw(st.integers(1, 16), label="run")) - 1
        data[first:last + 1] = bytes(last + 1 - first)
    with time_bound():
        got = read_or_refuse(scratch.write(bytes(data), v.suffix))
    if got is not None:
        assert_read_is_explicable(v, got, first, last)


class RunsCode:
    """Unpickling this runs ``call(*args)``: what a malicious weights file does."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


@pytest.mark.parametrize("container", ["zip", "legacy"])
@pytest.mark.parametrize("payload", ["os.system", "builtins.open"])
def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(container, payload, tmp_path):
    def evil(marker: Path) -> RunsCode:
        if payload == "os.system":
            return RunsCode(os.system, f"touch {marker}")
        return RunsCode(open, str(marker), "w")

    armed = tmp_path / "armed"
    pickle.loads(pickle.dumps(evil(armed), protocol=2))
    assert armed.exists()  # the payload runs when unpickled the ordinary way
    marker, src = tmp_path / "marker", tmp_path / "evil.pt"
    torch.save({"state_dict": lenet_state_dict(), "hook": evil(marker)}, src,
               _use_new_zipfile_serialization=container == "zip")
    assert zipfile.is_zipfile(src) == (container == "zip")
    with pytest.raises(WeightsFileError, match=r"refused: loading it would need arbitrary unpickling "
                                               r"\(it imports (posix\.system|io\.open|builtins\.open)\)"):
        read_weights(src, NET)
    assert not marker.exists()


def test_a_zip_file_saved_without_crcs_reads_unchecked_with_a_note(tmp_path):
    sd = lenet_state_dict()
    torch.serialization.set_crc32_options(False)
    try:
        torch.save(sd, tmp_path / "nocrc.pt")
    finally:
        torch.serialization.set_crc32_options(True)
    assert {i.CRC for i in zipfile.ZipFile(tmp_path / "nocrc.pt").infolist()} == {0}
    w = read_weights(tmp_path / "nocrc.pt", NET)
    assert ("the file has no CRC-32s (torch.serialization.set_crc32_options(False)); its bytes are read "
            "unchecked") in w.notes
    assert all(np.array_equal(w.state_dict[k], v.numpy()) for k, v in sd.items())


def test_declared_sizes_beyond_the_file_are_refused_before_allocating(tmp_path):
    """A tensor declared with 2**40 elements in a file of a few hundred bytes, in each format."""
    huge = 1 << 40
    header = b'{"w":{"dtype":"F32","shape":[%d],"data_offsets":[0,%d]}}' % (huge, 4 * huge)
    (tmp_path / "st.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    with zipfile.ZipFile(tmp_path / "zip.pt", "w") as z:  # valid CRCs: only torch's reader can object
        z.writestr("archive/data.pkl", torch_pickle([("w", "FloatStorage", (huge,), huge)]))
        z.writestr("archive/data/0", bytes(16))
        z.writestr("archive/version", "3\n")
    torch.save(OrderedDict(w=torch.zeros(4)), tmp_path / "l.pt", _use_new_zipfile_serialization=False)
    legacy = (tmp_path / "l.pt").read_bytes()
    at = legacy.index(b"K\x04N")  # the storage's numel (BININT1 4, then None), made a LONG1 of 2**40
    legacy = legacy[:at] + b"\x8a\x06" + huge.to_bytes(6, "little") + legacy[at + 2:]
    (tmp_path / "legacy.pt").write_bytes(legacy)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for name in ("st.safetensors", "zip.pt", "legacy.pt"):
        with pytest.raises(WeightsFileError):
            read_weights(tmp_path / name, NET)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 << 10  # KiB: nothing resident


# --------------------------------------------------------------------------- casts
@pytest.mark.parametrize("writer", ["torch.save", "safetensors"])
def test_float16_weights_are_cast_with_one_note(writer, tmp_path):
    half = OrderedDict((k, v.half()) for k, v in lenet_state_dict().items())
    path = tmp_path / ("m.pt" if writer == "torch.save" else "m.safetensors")
    if writer == "torch.save":
        torch.save(half, path)
    else:
        save_file(dict(half), path)
    w = read_weights(path, NET)
    assert [n for n in w.notes if n.startswith("cast")] == [CAST]
    for k, v in half.items():
        assert w.state_dict[k].dtype == np.float32 and np.array_equal(w.state_dict[k], v.float().numpy())


def test_mixed_dtypes_and_counters_are_one_note_and_int64_counters_none(tmp_path):
    sd = lenet_state_dict()
    mixed = {k: v.bfloat16() if k.endswith("bias") else v.double() if k.startswith("conv") else v.long()
             for k, v in sd.items()}
    save_file(mixed, tmp_path / "mixed.safetensors")
    notes = read_weights(tmp_path / "mixed.safetensors", NET).notes
    assert [n for n in notes if n.startswith("cast")] == [
        "cast 5 bfloat16, 2 float64 and 3 int64 tensors to float32 (the net's parameters are float32)"]
    bn = torch_ref.create("resnet20").state_dict()  # num_batches_tracked int64, as torch keeps it
    torch.save(bn, tmp_path / "bn.pt")
    assert not [n for n in read_weights(tmp_path / "bn.pt", "resnet20").notes if n.startswith("cast")]
    counters32 = {k: v.int() if k.endswith("num_batches_tracked") else v for k, v in bn.items()}
    torch.save(counters32, tmp_path / "i.pt")
    w = read_weights(tmp_path / "i.pt", "resnet20")
    assert [n for n in w.notes if n.startswith("cast")] == [
        "cast 19 int32 tensors to int64 (num_batches_tracked is int64)"]
    assert w.state_dict["bn1.num_batches_tracked"].dtype == np.int64


def test_convert_prints_the_cast_note_once(tmp_path, capsys):
    src, dst = tmp_path / "half.pt", tmp_path / "out.safetensors"
    torch.save(OrderedDict((k, v.half()) for k, v in lenet_state_dict().items()), src)
    assert convert_main(["--net", NET, str(src), str(dst)]) == 0
    out = capsys.readouterr().out
    assert out.count(CAST) == 1, out
    assert all(a.dtype == np.float32 for a in read_weights(dst, NET).state_dict.values())


# --------------------------------------------------------------------------- checkpoints
def arrays(tree) -> dict[str, tuple[str, bytes]]:
    """Every leaf by name as (dtype, bytes); PRNG keys as their key data and implementation."""
    out = {}
    for k, a in C.flatten(tree).items():
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            out[k] = (str(jax.random.key_impl(a)), np.asarray(jax.random.key_data(a)).tobytes())
        else:
            out[k] = (str(a.dtype), np.asarray(a).tobytes())
    return out


class Checkpoint:
    """A saved LeNet training-state checkpoint, the tree and meta in it, and its files."""

    def __init__(self, root: Path):
        model = flaxnets.create(NET, seed=0)
        _, params, rest = nnx.split(model, nnx.Param, ...)
        self.tree = {"model": C.as_dict(params, rest), "key": jax.random.key(3),
                     "count": jax.numpy.asarray(7, np.int32)}
        self.meta = {"epoch": 2, "net": NET, "num_classes": 10, "metrics": [{"epoch": 1, "val_acc": 0.5}]}
        self.path = C.save(root / "orig", self.tree, self.meta, step=2)
        step_dir = self.path / "2"
        self.files = sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*") if p.is_file())
        self.arrays = arrays(self.tree)
        # without a template keys come back as their key data (uint32)
        self.plain = {k: ("uint32", b) if k == "key" else (d, b) for k, (d, b) in self.arrays.items()}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Checkpoint:
    return Checkpoint(tmp_path_factory.mktemp("ckpt"))


JSON_FILES = ["meta/metadata", "integrity/metadata", "state/_METADATA", "state/array_metadatas/process_0",
              "state/_sharding", "_CHECKPOINT_METADATA"]


def test_the_checkpoint_has_the_files_the_fuzz_damages(ckpt):
    names = set(ckpt.files)
    assert {*JSON_FILES, "state/manifest.ocdbt"} <= names
    assert sum(n.startswith("state/ocdbt.process_0/d/") for n in names) >= 2  # the array data files


@settings(FUZZ, max_examples=80, deadline=20000)
@given(how=st.sampled_from(["flip", "overwrite", "truncate"]), in_json=st.booleans(),
       with_template=st.booleans(), draw=st.data())
def test_a_damaged_checkpoint_loads_exactly_or_is_refused(how, in_json, with_template, draw, ckpt, scratch):
    """Half the examples damage a JSON file (the meta, the checksums, orbax's metadata), half any file."""
    rel = draw.draw(st.sampled_from(JSON_FILES if in_json else ckpt.files), label="file")
    path = scratch.root / f"ck{next(scratch.count)}"
    shutil.copytree(ckpt.path, path)
    target = path / "2" / rel
    data = bytearray(target.read_bytes())
    if how == "truncate" or not data:
        del data[draw.draw(st.integers(0, max(len(data) - 1, 0)), label="length"):]
    else:
        at = draw.draw(st.integers(0, len(data) - 1), label="at")
        if how == "flip":
            data[at] ^= 1 << draw.draw(st.integers(0, 7), label="bit")
        else:
            data[at] = draw.draw(st.integers(0, 255).filter(lambda b: b != data[at]), label="byte")
    target.write_bytes(bytes(data))
    template = jax.tree.map(lambda a: a, ckpt.tree) if with_template else None
    with time_bound():
        try:
            tree, meta = C.load(path, template)
        except C.CheckpointError as e:
            assert str(path) in str(e), str(e)
            return
        finally:
            shutil.rmtree(path, ignore_errors=True)
    assert arrays(tree) == (ckpt.arrays if with_template else ckpt.plain), rel
    assert meta == ckpt.meta, rel
