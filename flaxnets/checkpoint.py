"""The Flax checkpoint file (``*.flax``): model weights, optionally the training state, one file.

Layout: 8-byte magic ``FLAXNETS``, 1-byte format version, the SHA-256 of the payload, then a
msgpack payload (``flax.serialization``) ``{"net", "num_classes", "meta" (JSON text), "model":
{"conv1.kernel": array, ...}, "train": {"path": array, ...} or absent}``. The checksum makes a
truncated or bit-flipped file an error instead of silently wrong weights, and every write goes
through a temporary file + ``fsync`` + ``os.replace``, so a crash during a save leaves the old
file intact. Model keys are the dotted paths of ``nnx.to_pure_dict`` (the state_dict prefixes).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx, serialization

from flaxnets.fit import CheckpointError
from flaxnets.runs import atomic_write_bytes

MAGIC = b"FLAXNETS"
VERSION = 1
SUFFIX = ".flax"
_HEADER = len(MAGIC) + 1 + 32




@dataclass
class Checkpoint:
    """The contents of one checkpoint file."""

    net: str
    num_classes: int
    model: dict[str, np.ndarray]  # dotted path -> array (params and batch statistics)
    train: dict[str, np.ndarray] | None = None  # flattened training state (optimiser, ...)
    meta: dict[str, Any] = field(default_factory=dict)  # JSON-able: epoch, metrics, config


# --------------------------------------------------------------------------- pytree <-> flat dict
def _is_key(a: Any) -> bool:
    return isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)


def flatten_tree(tree: Any) -> dict[str, np.ndarray]:
    """Leaves of ``tree`` as {key path string: numpy array} (PRNG keys as their raw key data)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if _is_key(leaf):
            leaf = jax.random.key_data(leaf)
        out[jax.tree_util.keystr(path)] = np.asarray(leaf)
    return out


def _check_fit(what: str, missing: list[str], unexpected: list[str], bad: list[str]) -> None:
    """Raise one CheckpointError that lists every missing, unexpected and mis-shaped key."""
    if not (missing or unexpected or bad):
        return
    lines = [f"the checkpoint's {what} does not fit:"]
    lines += [f"  missing: {k}" for k in missing[:20]] + [f"  unexpected: {k}" for k in unexpected[:20]]
    lines += [f"  shape: {b}" for b in bad[:20]]
    if max(len(missing), len(unexpected), len(bad)) > 20:
        lines.append(f"  ... ({len(missing)} missing, {len(unexpected)} unexpected, {len(bad)} mis-shaped)")
    raise CheckpointError("\n".join(lines))


def unflatten_like(template: Any, flat: dict[str, np.ndarray], what: str = "state") -> Any:
    """Rebuild ``template``'s pytree from ``flat`` (as made by ``flatten_tree``), strictly.

    Every key of the template must be present with its shape, and no other key: a mismatch
    raises CheckpointError listing the differences.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    keys = [jax.tree_util.keystr(p) for p, _ in leaves]
    missing = [k for k in keys if k not in flat]
    unexpected = sorted(set(flat) - set(keys))
    new = []
    bad = []
    for k, (_, leaf) in zip(keys, leaves):
        if k in missing:
            continue
        is_key = _is_key(leaf)
        ref = jax.random.key_data(leaf) if is_key else leaf
        arr = flat[k]
        if tuple(np.shape(arr)) != tuple(np.shape(ref)):
            bad.append(f"{k}: file {tuple(np.shape(arr))}, expected {tuple(np.shape(ref))}")
            continue
        arr = np.asarray(arr, dtype=np.asarray(ref).dtype if not is_key else np.uint32)
        new.append(jax.random.wrap_key_data(arr, impl=jax.random.key_impl(leaf)) if is_key else arr)
    _check_fit(what, missing, unexpected, bad)
    return jax.tree_util.tree_unflatten(treedef, new)


def model_to_flat(model: nnx.Module) -> dict[str, np.ndarray]:
    """The model's full state (params, batch statistics, dropout RNG keys as their raw key data)
    as {dotted path: numpy array}."""
    flat = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(nnx.state(model)))[0]:
        flat[_path_key(path)] = np.array(
            jax.random.key_data(leaf) if _is_key(leaf) else leaf)
    return flat


def _path_key(path: tuple) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def flat_into_model(model: nnx.Module, flat: dict[str, np.ndarray]) -> nnx.Module:
    """Load {dotted path: array} into ``model`` in place, strictly (every key, no other, same
    shapes). ``model`` may be abstract (``flaxnets.create_for_loading``)."""
    pure = nnx.to_pure_dict(nnx.state(model))
    leaves = {_path_key(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(pure)[0]}

    def shape(leaf: Any) -> tuple[int, ...]:  # key arrays are stored as key data: one more axis
        return tuple(jax.random.key_data(leaf).shape) if _is_key(leaf) else tuple(leaf.shape)

    missing = sorted(set(leaves) - set(flat))
    unexpected = sorted(set(flat) - set(leaves))
    bad = [f"{k}: file {tuple(flat[k].shape)}, model {shape(leaf)}"
           for k, leaf in leaves.items() if k in flat and tuple(flat[k].shape) != shape(leaf)]
    _check_fit("weights", missing, unexpected, bad)

    def put(path: tuple, leaf: Any) -> Any:
        key = _path_key(path)
        if _is_key(leaf):
            return jax.random.wrap_key_data(np.array(flat[key], np.uint32), impl=jax.random.key_impl(leaf))
        return np.array(flat[key], dtype=leaf.dtype)  # copy: never alias the file buffer

    pure = jax.tree_util.tree_map_with_path(put, pure)
    state = nnx.state(model)
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return model


# --------------------------------------------------------------------------- files
def save(path: str | os.PathLike, ckpt: Checkpoint) -> Path:
    """Write ``ckpt`` to ``path`` atomically (see the module docstring for the layout)."""
    payload: dict[str, Any] = {"net": ckpt.net, "num_classes": int(ckpt.num_classes),
                               "meta": json.dumps(ckpt.meta, default=str), "model": dict(ckpt.model)}
    if ckpt.train is not None:
        payload["train"] = dict(ckpt.train)
    body = serialization.msgpack_serialize(payload)
    head = MAGIC + bytes([VERSION]) + hashlib.sha256(body).digest()
    return atomic_write_bytes(path, head + body)


def load(path: str | os.PathLike) -> Checkpoint:
    """Read a checkpoint file; CheckpointError if it is not one, truncated or corrupt."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    if raw[: len(MAGIC)] != MAGIC:
        raise CheckpointError(f"{path} is not a flaxnets checkpoint (no {MAGIC.decode()} header)")
    if len(raw) < _HEADER:
        raise CheckpointError(f"{path} is truncated ({len(raw)} bytes)")
    if raw[len(MAGIC)] != VERSION:
        raise CheckpointError(f"{path} has checkpoint format version {raw[len(MAGIC)]}; "
                              f"this flaxnets reads version {VERSION}")
    body = raw[_HEADER:]
    if hashlib.sha256(body).digest() != raw[len(MAGIC) + 1: _HEADER]:
        raise CheckpointError(f"{path} is corrupt or truncated (checksum mismatch, {len(raw)} bytes)")
    try:
        d = serialization.msgpack_restore(body)
        return Checkpoint(net=str(d["net"]), num_classes=int(d["num_classes"]),
                          model={k: np.asarray(v) for k, v in d["model"].items()},
                          train=({k: np.asarray(v) for k, v in d["train"].items()}
                                 if "train" in d else None),
                          meta=json.loads(d["meta"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: malformed checkpoint payload ({e})") from None


def save_model(path: str | os.PathLike, net: str, model: nnx.Module, num_classes: int,
               meta: dict[str, Any] | None = None) -> Path:
    """Save a model's weights (no training state) as a checkpoint file."""
    return save(path, Checkpoint(net, num_classes, model_to_flat(model), None, dict(meta or {})))


def load_model(path: str | os.PathLike, net: str | None = None) -> nnx.Module:
    """A new model of the checkpoint's net with its weights; ``net`` checks the file's net name."""
    import flaxnets

    ckpt = load(path)
    if net is not None and ckpt.net != net:
        raise CheckpointError(f"{path} holds a {ckpt.net!r} checkpoint, not {net!r}")
    return flat_into_model(flaxnets.create_for_loading(ckpt.net, num_classes=ckpt.num_classes), ckpt.model)
