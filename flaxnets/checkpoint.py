"""JAX training checkpoints through orbax-checkpoint: one directory per checkpoint.

A checkpoint is an orbax ``CheckpointManager`` directory that keeps one step (the epoch)::

    last/<step>/state       the arrays: orbax StandardSave (OCDBT + zarr), a nested dict of names
    last/<step>/meta        JSON: the caller's meta (net, class count, epoch, metrics, ...)
    last/<step>/integrity   JSON: format, version, the SHA-256 of every array and of the meta

Orbax writes a step into ``<step>.orbax-checkpoint-tmp`` and renames it when every item is
written, then deletes the older step: a process killed during a save leaves the previous step
loadable, and the next save removes the unfinished directory. Saving is collective: on a
multi-host run every process calls ``save`` with the same global arrays (orbax writes each
replicated array once, from process 0) and ``load`` returns global arrays placed like the
template's.

The SHA-256s are checked on load because tensorstore checksums the OCDBT manifest and index but
not the array chunks: a flipped bit in a chunk file loads, without them, as a wrong weight; nor
does anything check the meta JSON, whose epoch and metrics a resumed run continues from.
Whatever orbax or tensorstore raise on a damaged or missing checkpoint becomes one
``CheckpointError`` naming the directory and the problem.

PRNG key arrays (dropout RNG state) are stored as their raw key data (uint32) and wrapped back
with the template key's implementation.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from flaxnets.fit import CheckpointError

FORMAT = "flaxnets-jax-checkpoint"
VERSION = 1
ITEMS = ("state", "meta", "integrity")


# --------------------------------------------------------------------------- trees <-> names
def _is_key(a: Any) -> bool:
    return jax.dtypes.issubdtype(getattr(a, "dtype", None), jax.dtypes.prng_key)


def _part(k: Any) -> str:
    for attr in ("key", "idx", "name"):  # DictKey / FlattenedIndexKey, SequenceKey, GetAttrKey
        if hasattr(k, attr):
            return str(getattr(k, attr))
    raise TypeError(f"unsupported pytree key {k!r}")


def leaf_names(tree: Any) -> list[tuple[str, ...]]:
    """Each leaf's name in ``tree``'s flatten order: its key path as strings, without the
    trailing ``.value`` attribute of an ``nnx.Variable``."""
    names = []
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
            path = path[:-1]
        names.append(tuple(_part(k) for k in path))
    return names


def as_dict(*trees: Any) -> dict[str, Any]:
    """The leaves of ``trees`` as one nested dict by their names (the checkpoint's layout);
    ``nnx.split``'s parts of one model merge back into the model's nested dict."""
    out: dict[str, Any] = {}
    for tree in trees:
        for name, leaf in zip(leaf_names(tree), jax.tree.leaves(tree)):
            node = out
            for part in name[:-1]:
                node = node.setdefault(part, {})
            if name[-1] in node:
                raise ValueError(f"two leaves named {'/'.join(name)}")
            node[name[-1]] = leaf
    return out


def from_dict(template: Any, d: dict[str, Any]) -> Any:
    """``template``'s pytree with each leaf taken from ``d`` by its name (``as_dict``'s inverse;
    ``d`` may hold more)."""
    leaves = []
    for name in leaf_names(template):
        node = d
        for part in name:
            node = node[part]
        leaves.append(node)
    return jax.tree_util.tree_unflatten(jax.tree.structure(template), leaves)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'model/conv1/kernel': leaf} of a nested dict (the names checkpoint errors use)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, v in flat.items():
        *parents, last = name.split("/")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = v
    return out


def _host(a: Any) -> np.ndarray:
    """A (replicated) array's value on this host."""
    if isinstance(a, jax.Array) and not a.is_fully_addressable:
        if not a.sharding.is_fully_replicated:
            raise ValueError("checkpoint checksums need replicated arrays")
        a = a.addressable_data(0)
    return np.asarray(a)


def _sha256(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).view(np.uint8)).hexdigest()


def _meta_sha256(meta: dict[str, Any]) -> str:
    """SHA-256 of the meta's canonical JSON (sorted keys): what save wrote and load read agree on it."""
    return hashlib.sha256(json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


# --------------------------------------------------------------------------- orbax
def _options(write: bool) -> ocp.CheckpointManagerOptions:
    return ocp.CheckpointManagerOptions(
        max_to_keep=1, create=write, enable_async_checkpointing=False,
        cleanup_tmp_directories=write)


@contextlib.contextmanager
def _manager(path: Path, write: bool) -> Iterator[ocp.CheckpointManager]:
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler(),
                "integrity": ocp.JsonCheckpointHandler()}
    mngr = ocp.CheckpointManager(path.absolute(), options=_options(write), item_handlers=handlers)
    try:
        yield mngr
    finally:
        mngr.close()


def _read(where: Path, fn: Callable[[], Any]) -> Any:
    """``fn()``, with whatever orbax or tensorstore raise as one CheckpointError about ``where``."""
    _drop_abandoned_reads()
    try:
        return fn()
    except OSError as e:
        raise CheckpointError(f"cannot read {where}: {e.strerror or e}") from None
    except Exception as e:  # KeyError, ValueError, JSONDecodeError, plain Exception, ...
        raise CheckpointError(f"{where} is corrupt or truncated ({_reason(e)})") from None


_dropping = False


def _drop_abandoned_reads() -> None:
    """Silence the reads a failed restore leaves behind (installed once, before the first read).

    Orbax stops at the first failed read and closes its event loop; the other reads finish on
    tensorstore's threads, some before the failure has reached this module, and each reports
    'Event loop is closed' or its own error as an 'Exception ignored' traceback on stderr. This
    unraisable-exception hook drops those two kinds and passes every other one on to the hook
    it replaces.
    """
    global _dropping
    if _dropping:
        return
    _dropping = True
    previous = sys.unraisablehook

    def hook(u: Any) -> None:
        code = getattr(u.object, "cr_code", None)  # a coroutine of orbax's
        tb = u.exc_traceback
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        if (code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename) or (
                isinstance(u.exc_value, RuntimeError) and str(u.exc_value) == "Event loop is closed"
                and tb is not None and tb.tb_frame.f_code.co_name == "_check_closed"):
            return
        previous(u)

    sys.unraisablehook = hook


def _reason(e: BaseException) -> str:
    """An orbax/tensorstore exception as one short line: its root cause (orbax wraps
    tensorstore's status message in an Exception that prints the whole TensorStore spec)."""
    while (e.__cause__ or e.__context__) is not None:
        e = e.__cause__ or e.__context__
    text = " ".join(str(e).split()) or type(e).__name__
    if len(text) > 240:
        text = f"{text[:110]} ... {text[-110:]}"
    return f"{type(e).__name__}: {text}"


def steps(path: str | Path) -> list[int]:
    """The finished steps in checkpoint directory ``path`` (none if it does not exist)."""
    path = Path(path)
    return sorted(ocp.utils.checkpoint_steps(path)) if path.is_dir() else []


def exists(path: str | Path) -> bool:
    """Whether ``path`` holds a finished checkpoint."""
    return bool(steps(path))


def save(path: str | Path, tree: Any, meta: dict[str, Any], *, step: int) -> Path:
    """Write ``tree`` (nested dict of str -> array; jax arrays, replicated when multi-host) and
    the JSON-able ``meta`` as step ``step`` of checkpoint directory ``path``; the older step is
    deleted once this one is complete. Collective: every process of a multi-host run calls it."""
    path = Path(path)
    flat = {k: jax.random.key_data(v) if _is_key(v) else v for k, v in flatten(tree).items()}
    meta = json.loads(json.dumps(meta, default=str))  # tuples as lists, as load returns them
    integrity = {"format": FORMAT, "version": VERSION,
                 "sha256": {k: _sha256(_host(v)) for k, v in flat.items()}, "meta_sha256": _meta_sha256(meta)}
    with _manager(path, write=True) as mngr:
        for old in mngr.all_steps():
            if old >= step:  # a new run over an older run's checkpoints
                mngr.delete(old)
        mngr.save(step, force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(_nest(flat)), meta=ocp.args.JsonSave(meta),
            integrity=ocp.args.JsonSave(integrity)))
    return path


def read_meta(path: str | Path, step: int | None = None) -> tuple[int, dict[str, Any]]:
    """(step, meta) of the latest (or the given) step of ``path``, without reading the arrays."""
    step, meta, _, _ = _read_json(Path(path), step)
    return step, meta


def _read_json(path: Path, step: int | None) -> tuple[int, dict[str, Any], dict[str, Any],
                                                      dict[str, jax.ShapeDtypeStruct]]:
    """(step, meta, integrity, the stored arrays' shapes and dtypes by name) of a checkpoint,
    checked for its format and the meta for its SHA-256 (when the integrity record has one)."""
    found = steps(path)
    if not found:
        what = ("no finished checkpoint" if path.is_dir() else "not a checkpoint directory"
                if path.exists() else "no such directory")
        raise CheckpointError(f"{path}: {what}")
    step = found[-1] if step is None else step
    if step not in found:
        raise CheckpointError(f"{path} has no step {step} (steps: {found})")
    where = path / str(step)
    for item in ITEMS:
        if not (where / item).is_dir():
            raise CheckpointError(f"{where} is incomplete or not a flaxnets JAX checkpoint (no {item}/)")

    def read() -> tuple[Any, Any, dict[str, jax.ShapeDtypeStruct] | None]:
        with _manager(path, write=False) as mngr:
            got = mngr.restore(step, args=ocp.args.Composite(
                meta=ocp.args.JsonRestore(), integrity=ocp.args.JsonRestore()))
            stored = mngr.item_metadata(step)["state"]
        # plain shapes and dtypes here, so that metadata of the wrong kind is a CheckpointError too
        shapes = None if stored is None else {k: jax.ShapeDtypeStruct(tuple(v.shape), np.dtype(v.dtype))
                                              for k, v in flatten(dict(stored)).items()}
        return got["meta"], got["integrity"], shapes

    meta, integrity, stored = _read(where, read)
    if not isinstance(integrity, dict) or integrity.get("format") != FORMAT:
        raise CheckpointError(f"{where} is not a flaxnets JAX checkpoint")
    if integrity.get("version") != VERSION:
        raise CheckpointError(f"{where} has checkpoint format version {integrity.get('version')}; "
                              f"this flaxnets reads version {VERSION}")
    if not isinstance(meta, dict) or stored is None or not isinstance(integrity.get("sha256"), dict):
        raise CheckpointError(f"{where} is corrupt or truncated (no meta, array metadata or checksums)")
    if integrity.get("meta_sha256", _meta_sha256(meta)) != _meta_sha256(meta):
        raise CheckpointError(f"{where} is corrupt or truncated (meta: checksum mismatch)")
    return step, meta, integrity, stored


def _check_fit(where: Path, stored: dict[str, jax.ShapeDtypeStruct], want: dict[str, Any]) -> None:
    """One CheckpointError listing every missing, unexpected and mis-shaped array."""
    missing = [k for k in want if k not in stored]
    unexpected = [k for k in stored if k not in want]
    bad = [f"{k}: checkpoint {tuple(stored[k].shape)} {np.dtype(stored[k].dtype)}, expected "
           f"{tuple(want[k].shape)} {np.dtype(want[k].dtype)}" for k in want if k in stored
           and (tuple(stored[k].shape), np.dtype(stored[k].dtype)) != (tuple(want[k].shape), np.dtype(want[k].dtype))]
    if not (missing or unexpected or bad):
        return
    lines = [f"the arrays of {where} do not fit:"]
    lines += [f"  missing: {k}" for k in missing[:20]] + [f"  unexpected: {k}" for k in unexpected[:20]]
    lines += [f"  mismatch: {b}" for b in bad[:20]]
    if max(len(missing), len(unexpected), len(bad)) > 20:
        lines.append(f"  ... ({len(missing)} missing, {len(unexpected)} unexpected, {len(bad)} mis-shaped)")
    raise CheckpointError("\n".join(lines))


def load(path: str | Path, template: Any = None, step: int | None = None
         ) -> tuple[Any, dict[str, Any]]:
    """(tree, meta) of the latest (or the given) step of checkpoint directory ``path``.

    ``template``, a nested dict like the one saved (arrays or ``jax.ShapeDtypeStruct`` with a
    sharding; PRNG key arrays for keys), gives the arrays' shapes, dtypes and placement: every
    name must be there with its shape and no other (else a CheckpointError listing them). With
    no template the arrays come back as numpy, keys as their key data. Every array saved must
    come back and match its SHA-256, and the meta its own.
    """
    path = Path(path)
    step, meta, integrity, stored = _read_json(path, step)
    where = path / str(step)
    keys: dict[str, Any] = {}
    abstract: dict[str, jax.ShapeDtypeStruct] | None = None
    if template is not None:
        tflat = flatten(template)
        keys = {k: v for k, v in tflat.items() if _is_key(v)}
        abstract = {k: jax.ShapeDtypeStruct(
            jax.eval_shape(jax.random.key_data, v).shape if k in keys else v.shape,
            np.uint32 if k in keys else v.dtype, sharding=getattr(v, "sharding", None))
            for k, v in tflat.items()}
        _check_fit(where, stored, abstract)

    def read() -> Any:
        # with no template, numpy leaves make orbax restore numpy arrays; built here, where a
        # shape the metadata declares but no memory holds is a CheckpointError like any damage
        item = abstract if abstract is not None else {
            k: np.zeros(v.shape, v.dtype) for k, v in stored.items()}
        with _manager(path, write=False) as mngr:
            return mngr.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_nest(item))))["state"]

    state = _read(where, read)
    flat = flatten(state)
    sums = integrity["sha256"]
    if set(flat) != set(sums):
        lost = sorted(set(flat) ^ set(sums))
        raise CheckpointError(f"{where} is corrupt or truncated ({len(lost)} arrays not both stored and "
                              f"checksummed, e.g. {lost[0]})")
    for k, v in flat.items():
        if sums.get(k) != _sha256(_host(v)):
            raise CheckpointError(f"{where} is corrupt or truncated ({k}: checksum mismatch)")
    for k, ref in keys.items():
        flat[k] = jax.random.wrap_key_data(flat[k], impl=jax.random.key_impl(ref))
    return _nest(flat), meta
