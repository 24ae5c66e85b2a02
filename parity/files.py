"""Weight files in every format people hand around, read and written the same way everywhere.

Formats: PyTorch pickles (``.pt``/``.pth``/``.th``/``.bin``, zip or legacy pre-1.6 format) and
``.safetensors``, both in torch ``state_dict`` layout and key names; a Flax model gets its
weights from them through ``parity.convert`` (``torch_to_flax``, ``load_state_dict``).
``read_weights`` takes a file as found (wrappers such as ``{"state_dict": ..., "epoch": ...}``,
``module.``/``_orig_mod.`` prefixes, CUDA-saved tensors, torchvision's old ``norm.1`` keys) and
returns a torch-layout ``state_dict`` of numpy arrays, each in the dtype the nets store it in,
plus notes on what it unwrapped, stripped, cast or ignored. A damaged file is a WeightsFileError,
never a partial or silently different read where the format can tell (zip records carry CRC-32s;
legacy pickles and safetensors carry no checksum of their data). ``write_weights`` writes either
format atomically and never over an existing file unless told to. ``convert_file`` is
``scripts/convert.py``: read, convert strictly, compare both frameworks' logits, write.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import warnings
import zipfile
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flax import nnx

import flaxnets
from flaxnets.runs import atomic_write_bytes
from flaxnets.introspect import count_params
from parity.convert import normalize_keys, to_numpy, to_numpy_state_dict, torch_to_flax
from parity.torchfile import torch_save_bytes

if TYPE_CHECKING:
    from parity.check import EvalLogits

TORCH_SUFFIXES = (".pt", ".pth", ".th", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
FORMAT_NAMES = {"torch": "PyTorch pickle", "safetensors": "safetensors"}
SUPPORTED = f"PyTorch ({', '.join(TORCH_SUFFIXES)}) or safetensors ({SAFETENSORS_SUFFIX})"
# Keys under which training scripts store the model's state_dict, most specific first.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")
# Key prefixes added by DataParallel/DDP and by torch.compile; stripped when every key has one.
STRIP_PREFIXES = ("module.", "_orig_mod.")
# The dtypes every net stores in torch layout: BatchNorm's counter as torch keeps it, all else
# float32; a file's tensors of other dtypes are cast on reading, and a note says so.
COUNTER_SUFFIX, COUNTER_DTYPE, PARAM_DTYPE = ".num_batches_tracked", "int64", "float32"
WHY_DTYPE = {PARAM_DTYPE: f"the net's parameters are {PARAM_DTYPE}",
             COUNTER_DTYPE: f"num_batches_tracked is {COUNTER_DTYPE}"}


class WeightsFileError(ValueError):
    """A file that cannot be read or written as asked; the message is one line meant for users."""


class ConversionCheckError(RuntimeError):
    """Converted weights do not compute the same logits in both frameworks, or do not read back."""


@dataclass
class Weights:
    """Weights read from one file, in torch layout and key names, and how they were found."""

    state_dict: OrderedDict[str, np.ndarray]
    num_classes: int
    format: str  # "torch" or "safetensors"
    sha256: str
    notes: list[str] = field(default_factory=list)  # what was unwrapped, stripped, renamed, ignored
    meta: dict[str, Any] = field(default_factory=dict)  # the file's own metadata, if it has any


# --------------------------------------------------------------------------- formats
def output_format(path: str | os.PathLike) -> str:
    """The format a file name asks for ("torch", "safetensors"); WeightsFileError otherwise."""
    suffix = Path(path).suffix.lower()
    if suffix in TORCH_SUFFIXES:
        return "torch"
    if suffix == SAFETENSORS_SUFFIX:
        return "safetensors"
    raise WeightsFileError(f"{path}: unknown weights file type {suffix or '(no suffix)'!r}; weights "
                           f"files are {SUPPORTED}")


def detect_format(path: str | os.PathLike) -> str:
    """The format of an existing file, from its first bytes (so a misnamed file still reads)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError as e:
        raise WeightsFileError(f"cannot read {path}: {e.strerror or e}") from None
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # torch zip / legacy pickle
        return "torch"
    if len(head) > 8 and head[8:9] == b"{":  # u64 header length, then the JSON header
        return "safetensors"
    raise WeightsFileError(f"{path} is not a weights file of a supported format: {SUPPORTED}")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in chunks (weights files can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def infer_num_classes(net: str, state_dict: Mapping[str, Any]) -> int | None:
    """Rows of the net's classifier weight (``spec.head``), or None if the state_dict has none
    (or it is 0-d: the strict conversion reports its shape)."""
    head = state_dict.get(f"{flaxnets.get_spec(net).head}.weight")
    return None if head is None or not np.shape(head) else int(np.shape(head)[0])


def same_state_dict(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> bool:
    """Bit-exact equality: same keys (in any order: safetensors sorts them), dtypes, shapes, values."""
    return set(a) == set(b) and all(
        np.asarray(a[k]).dtype == np.asarray(b[k]).dtype and np.array_equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- reading
def _unwrap(obj: Any, path: Path, notes: list[str]) -> Mapping[str, Any]:
    """The tensor dict inside what torch.load returned, descending through wrapper dicts."""
    import torch

    while True:
        if not isinstance(obj, Mapping) or not obj:
            raise WeightsFileError(f"{path} holds a {type(obj).__name__}"
                                   f"{' (empty)' if isinstance(obj, Mapping) else ''}, not a state_dict")
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            odd = next((k for k in obj if not isinstance(k, str)), None)
            if odd is not None:
                raise WeightsFileError(f"{path}: the state_dict has a {type(odd).__name__} key, not a name")
            return obj
        key = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            found = ", ".join(f"{k} ({type(v).__name__})" for k, v in list(obj.items())[:12])
            raise WeightsFileError(f"{path}: no state_dict found: the dict holds {found}; expected "
                                   f"tensors or a dict of them under one of {', '.join(WRAPPER_KEYS)}")
        others = [str(k) for k in obj if k != key]
        notes.append(f"took the state_dict under {key!r}"
                     + (f"; ignored {', '.join(others)}" if others else ""))
        obj = obj[key]


def _strip_prefixes(state_dict: Mapping[str, Any], notes: list[str]) -> OrderedDict[str, Any]:
    """Remove ``module.``/``_orig_mod.`` (in any order, repeatedly) where every key carries it."""
    sd = OrderedDict(state_dict)
    stripped = True
    while stripped:
        stripped = False
        for prefix in STRIP_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = OrderedDict((k[len(prefix):], v) for k, v in sd.items())
                notes.append(f"stripped the prefix {prefix!r} from every key")
                stripped = True
    return sd


def _add_num_batches_tracked(sd: OrderedDict[str, Any], notes: list[str]) -> OrderedDict[str, Any]:
    """Give a file saved before PyTorch 0.4.1 (BatchNorm layers, no ``num_batches_tracked`` at all,
    e.g. torchvision's published DenseNets) the counter 0, as torch's own loader does for them.

    A file that has the counter for some BatchNorm layers and not others is left to the strict
    conversion, which reports each missing key.
    """
    if any(k.endswith(".num_batches_tracked") for k in sd):
        return sd
    out: OrderedDict[str, Any] = OrderedDict()
    added = 0
    for key, value in sd.items():
        out[key] = value
        if key.endswith(".running_var"):
            out[key[: -len("running_var")] + "num_batches_tracked"] = np.array(0, dtype=np.int64)
            added += 1
    if added:
        notes.append(f"added num_batches_tracked = 0 to {added} BatchNorm layers (the file predates "
                     f"PyTorch 0.4.1; torch's load_state_dict does the same)")
    return out


def _unsafe_reason(message: str) -> str:
    """What torch's weights-only unpickler refused, in a few words (not its allowlisting advice)."""
    found = re.search(r"GLOBAL ([\w.]+)", message)
    if found:
        return f"it imports {found.group(1)}"
    found = re.search(r"Unsupported operand \d+", message)
    return found.group(0).lower() if found else "it holds objects other than tensors and plain containers"


def _stored(tensors: Mapping[str, Any], path: Path, notes: list[str]) -> OrderedDict[str, np.ndarray]:
    """A file's torch tensors as numpy arrays in the dtypes the nets store (``PARAM_DTYPE``,
    ``COUNTER_DTYPE``), with one note counting the casts that took."""
    import torch

    casts: Counter[tuple[str, str]] = Counter()
    out: OrderedDict[str, np.ndarray] = OrderedDict()
    for key, t in tensors.items():
        want = COUNTER_DTYPE if key.endswith(COUNTER_SUFFIX) else PARAM_DTYPE
        have = str(t.dtype).removeprefix("torch.")
        try:
            if have != want:
                casts[have, want] += 1
                t = t.to(getattr(torch, want))
            out[key] = to_numpy(t)
        except (TypeError, RuntimeError) as e:  # sparse, quantized, meta, ... tensors
            raise WeightsFileError(f"{path}: {key} ({have}, {t.layout}) is not a plain tensor: "
                                   f"{_first_line(e)}") from e
    parts, why = [], []
    for want, reason in WHY_DTYPE.items():
        found = [(have, n) for (have, w), n in sorted(casts.items()) if w == want]
        if found:
            counts = [f"{n} {have}" for have, n in found]
            counts[-2:] = [" and ".join(counts[-2:])]
            many = sum(n for _, n in found) > 1
            parts.append(f"{', '.join(counts)} tensor{'s' * many} to {want}")
            why.append(reason)
    if parts:
        notes.append(f"cast {'; '.join(parts)} ({'; '.join(why)})")
    return out


def _first_line(e: BaseException) -> str:
    """An exception's message in one line (its type if it has none)."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _check_zip_records(path: Path, notes: list[str]) -> None:
    """Every record of a torch zip file read against the zip directory: named once, a file (not
    a folder), of the size it says, matching its CRC-32. torch.load checks none of these, and a
    flipped bit in a tensor's bytes would load as a wrong weight. A file saved with
    ``torch.serialization.set_crc32_options(False)`` (every CRC 0) is read unchecked, and noted."""
    with zipfile.ZipFile(path) as z:
        infos = z.infolist()
        twice = [name for name, n in Counter(i.filename for i in infos).items() if n > 1]
        if twice:
            raise WeightsFileError(f"{path} is damaged: the zip directory names {twice[0]} twice")
        if all(i.CRC == 0 for i in infos):
            notes.append("the file has no CRC-32s (torch.serialization.set_crc32_options(False)); "
                         "its bytes are read unchecked")
            return
        for info in infos:
            if info.external_attr & 0x10:  # torch's zip reader (miniz) then reads nothing into the tensor
                raise WeightsFileError(f"{path} is damaged: the zip directory marks {info.filename} "
                                       f"as a folder")
            with z.open(info) as f:  # raises BadZipFile on a CRC mismatch
                size = sum(len(chunk) for chunk in iter(lambda: f.read(1 << 20), b""))
            if size != info.file_size:
                raise WeightsFileError(f"{path} is damaged: record {info.filename} holds {size} bytes, "
                                       f"the zip directory says {info.file_size}")


def read_torch_state_dict(path: str | os.PathLike) -> tuple[OrderedDict[str, np.ndarray], list[str]]:
    """A PyTorch pickle's state_dict as numpy arrays (``_stored``), plus notes, loaded without
    running code.

    ``torch.load(weights_only=True)`` onto the CPU (zip or legacy format, CUDA-saved or not),
    a zip file's records checked first (``_check_zip_records``); a pickle that needs arbitrary
    objects is refused with WeightsFileError, never executed.
    """
    import torch

    path, notes, locations = Path(path), [], set()

    def to_cpu(storage: Any, location: str) -> Any:  # records where the tensors were saved
        if not isinstance(location, str):
            raise WeightsFileError(f"{path} is damaged: a storage's device is a {type(location).__name__}")
        locations.add(location)
        return storage

    try:
        with open(path, "rb") as f:
            head = f.read(4)
        if head == b"PK\x03\x04":  # the zip format (torch.load's own test); else legacy
            _check_zip_records(path, notes)
        with warnings.catch_warnings():  # torch warns about legacy pickle protocols
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location=to_cpu, weights_only=True)
    except WeightsFileError:
        raise
    except pickle.UnpicklingError as e:
        raise WeightsFileError(f"{path} refused: loading it would need arbitrary unpickling "
                               f"({_unsafe_reason(str(e))}); only tensors and plain containers are "
                               f"loaded (weights_only=True). If you trust the file, re-save its "
                               f"state_dict with torch.save(model.state_dict(), ...)") from None
    except Exception as e:
        # The format boundary. zipfile and torch's reader and weights-only unpickler raise what
        # their parsing hits on damaged bytes (BadZipFile, RuntimeError, EOFError, IndexError,
        # KeyError, TypeError, struct.error, AssertionError, ...): all of it is an unreadable file.
        raise WeightsFileError(f"{path} cannot be read as a PyTorch file: {_first_line(e)}") from e
    if head[:2] == b"\x80\x02":
        notes.append("legacy (pre-1.6, non-zip) torch format")
    on_gpu = sorted(loc for loc in locations if loc != "cpu")
    if on_gpu:
        notes.append(f"tensors saved on {', '.join(on_gpu)}, loaded onto the CPU")
    sd = _stored(_strip_prefixes(_unwrap(obj, path, notes), notes), path, notes)
    return sd, notes


def _read_safetensors(path: Path) -> tuple[OrderedDict[str, np.ndarray], dict[str, str], list[str]]:
    """Tensors (through torch, so bf16/fp16 files read too; ``_stored``), the header metadata, notes."""
    from safetensors import SafetensorError, safe_open

    notes: list[str] = []
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            tensors = OrderedDict((k, f.get_tensor(k)) for k in f.keys())
    except (SafetensorError, OSError) as e:
        raise WeightsFileError(f"{path} cannot be read as safetensors: {e}") from None
    if not tensors:
        raise WeightsFileError(f"{path} holds no tensors")
    return _stored(_strip_prefixes(tensors, notes), path, notes), meta, notes


def read_weights(path: str | os.PathLike, net: str, num_classes: int | None = None) -> Weights:
    """Read a weights file of net ``net`` as a torch-layout state_dict of numpy arrays.

    The format comes from the file's content. ``num_classes`` defaults to the rows of the
    classifier weight. The state_dict is not yet checked against the net: ``torch_to_flax``
    (a Flax model holding the weights) and ``load_state_dict`` do that strictly.
    """
    flaxnets.get_spec(net)
    path = Path(path)
    fmt = detect_format(path)
    sha = sha256_file(path)
    notes: list[str] = []
    suffix_fmt = None
    try:
        suffix_fmt = output_format(path)
    except WeightsFileError:
        pass
    if suffix_fmt not in (None, fmt):
        notes.append(f"the file is a {FORMAT_NAMES[fmt]} although its name says {FORMAT_NAMES[suffix_fmt]}")
    if fmt == "torch":
        sd, more = read_torch_state_dict(path)
        meta: dict[str, Any] = {}
    else:
        sd, meta, more = _read_safetensors(path)
        if meta.get("net", net) != net:
            raise WeightsFileError(f"{path} holds {meta['net']!r} weights (its metadata says), not {net!r}")
    notes += more
    normalized = normalize_keys(sd)
    renamed = sum(a != b for a, b in zip(sd, normalized))
    if renamed:
        notes.append(f"renamed {renamed} old-style torchvision keys (norm.1 -> norm1)")
    normalized = _add_num_batches_tracked(normalized, notes)
    inferred = infer_num_classes(net, normalized)
    if num_classes is None:
        num_classes = inferred if inferred is not None else flaxnets.get_spec(net).num_classes
        how = f"from {flaxnets.get_spec(net).head}.weight" if inferred is not None else "the registry default"
        notes.append(f"num_classes {num_classes} ({how})")
    return Weights(normalized, num_classes, fmt, sha, notes, meta)


# --------------------------------------------------------------------------- writing
def _serialize(fmt: str, state_dict: Mapping[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """The bytes of a torch file (a bare state_dict, written without importing torch) or of a
    safetensors file."""
    if fmt == "safetensors":
        from safetensors.numpy import save

        return save(dict(state_dict), metadata=metadata)
    return torch_save_bytes(state_dict)


def write_weights(path: str | os.PathLike, net: str, weights: nnx.Module | Mapping[str, Any],
                  num_classes: int | None = None, *, source: str | os.PathLike | None = None,
                  meta: Mapping[str, Any] | None = None, force: bool = False) -> Path:
    """Write a Flax model or a torch-layout state_dict of ``net`` in the format ``path`` names.

    Atomic (temporary file + rename); refuses an existing ``path`` unless ``force``.
    safetensors files carry metadata (net, num_classes, ``source`` file name and sha256, ``meta``
    as strings); torch files are a bare state_dict.
    """
    path = Path(path)
    fmt = output_format(path)
    flaxnets.get_spec(net)
    if path.exists() and not force:
        raise WeightsFileError(f"{path} already exists; not overwriting it without --force (force=True)")
    if isinstance(weights, nnx.Module):
        sd = to_numpy_state_dict(weights)
    else:
        sd = OrderedDict((k, np.array(to_numpy(v), order="C")) for k, v in normalize_keys(weights).items())
    rows = infer_num_classes(net, sd)
    if num_classes is not None and rows is not None and rows != num_classes:
        raise WeightsFileError(f"num_classes {num_classes} does not fit the weights' "
                               f"{flaxnets.get_spec(net).head}.weight with {rows} rows")
    num_classes = num_classes if num_classes is not None else rows or flaxnets.get_spec(net).num_classes
    info: dict[str, Any] = {"net": net, "num_classes": num_classes}
    if source is not None:
        info.update(source=Path(source).name, source_sha256=sha256_file(source))
    info.update(meta or {})
    metadata = {"format": "pt", **{k: str(v) for k, v in info.items()}}  # "pt": what HF loaders expect
    return atomic_write_bytes(path, _serialize(fmt, sd, metadata))


# --------------------------------------------------------------------------- converting
def _eval_logits(net: str, state_dict: Mapping[str, Any], fmodel: nnx.Module, seed: int = 0,
                 batch: int = 2) -> tuple[EvalLogits, tuple[int, ...]]:
    """``parity.check.compare_eval_logits`` of the torch net holding ``state_dict`` and ``fmodel``
    on a fixed random batch of the net's parity input, and that batch's NCHW shape. Imports torch
    (here, not at the top: writing a file does not need it)."""
    import torch

    import torch_ref
    from parity.check import compare_eval_logits

    spec = flaxnets.get_spec(net)
    tmodel = torch_ref.create(net, num_classes=infer_num_classes(net, state_dict))
    tmodel.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}, strict=True)
    h, w, c = spec.check_shape
    x = np.random.RandomState(seed).randn(batch, c, h, w).astype(np.float32)
    return compare_eval_logits(tmodel, fmodel, x, jit=spec.many_small_ops), x.shape


@dataclass
class Conversion:
    """What ``convert_file`` read, checked and wrote."""

    src: Path
    dst: Path
    net: str
    weights: Weights  # as read from src
    params: int
    delta: float  # max|Δ| of the eval logits, torch vs Flax
    tolerance: float  # LOGIT_RTOL·max(1, max|torch logits|)
    batch_shape: tuple[int, ...]
    dst_format: str


def convert_file(src: str | os.PathLike, dst: str | os.PathLike, net: str, num_classes: int | None = None,
                 force: bool = False) -> Conversion:
    """Convert weights file ``src`` of ``net`` into ``dst`` (formats from content and file name).

    Strict conversion into the Flax net, then both frameworks' eval logits on a fixed random
    batch must agree within the parity tolerance (else ConversionCheckError, nothing written);
    the written file is read back and must equal the converted weights bit for bit.
    """
    src, dst = Path(src), Path(dst)
    dst_format = output_format(dst)
    if dst.exists() and not force:  # before the (possibly long) read
        raise WeightsFileError(f"{dst} already exists; not overwriting it without --force")
    weights = read_weights(src, net, num_classes)
    fmodel = torch_to_flax(net, weights.state_dict, weights.num_classes)
    sd = to_numpy_state_dict(fmodel)
    logits, batch_shape = _eval_logits(net, sd, fmodel)
    if not logits.same_shape:
        raise ConversionCheckError(f"logits have shape {logits.flax_out.shape} in Flax, "
                                   f"{logits.torch_out.shape} in torch")
    if not logits.ok:
        raise ConversionCheckError(f"torch and Flax logits differ by {logits.max_abs:.2e} > tolerance "
                                   f"{logits.tolerance:.2e}; nothing written")
    write_weights(dst, net, fmodel, weights.num_classes, source=src, force=force)
    if not same_state_dict(read_weights(dst, net).state_dict, sd):
        raise ConversionCheckError(f"{dst} was written but does not read back bit-exact")
    return Conversion(src, dst, net, weights, count_params(fmodel), logits.max_abs, logits.tolerance,
                      batch_shape, dst_format)
