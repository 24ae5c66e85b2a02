"""flaxnets.checkpoint: the .flax file is exact, checksummed, strict and written atomically."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import flaxnets
from flaxnets import checkpoint as C


def test_model_round_trip_is_bit_exact_including_dropout_rng_keys(tmp_path):
    m = flaxnets.create("net_dropout", seed=1)
    C.save_model(tmp_path / "m.flax", "net_dropout", m, 2, {"epoch": 3})
    back = C.load_model(tmp_path / "m.flax", "net_dropout")  # built with seed 0: all replaced
    a, b = C.model_to_flat(m), C.model_to_flat(back)
    assert list(a) == list(b) and any(k.endswith("rngs.key") for k in a)
    assert all(a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)
    assert C.load(tmp_path / "m.flax").meta == {"epoch": 3}
    with pytest.raises(C.CheckpointError, match="holds a 'net_dropout' checkpoint, not 'net'"):
        C.load_model(tmp_path / "m.flax", "net")


def test_optimizer_state_round_trip_and_strictness():
    m = flaxnets.create("net_batchnorm")
    _, params, _ = nnx.split(m, nnx.Param, ...)
    tx = optax.chain(optax.add_decayed_weights(1e-4), optax.sgd(0.1, momentum=0.9))
    state = {"opt": jax.tree.map(lambda a: a + 1.5, tx.init(params)), "key": jax.random.key(3)}
    flat = C.flatten_tree(state)
    back = C.unflatten_like({"opt": tx.init(params), "key": jax.random.key(0)}, flat)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(C.flatten_tree(back)),
                                                    jax.tree.leaves(flat)))
    del flat["['key']"]
    flat["['extra']"] = np.zeros(1)
    k = next(k for k in flat if k.endswith("['fc1']['kernel'].value"))
    flat[k] = np.zeros((3, 3))
    with pytest.raises(C.CheckpointError) as e:
        C.unflatten_like(state, flat, "optimiser state")
    msg = str(e.value)
    assert "missing: ['key']" in msg and "unexpected: ['extra']" in msg
    assert "file (3, 3), expected (1024, 32)" in msg


def test_damaged_files_are_errors_not_wrong_weights(tmp_path):
    m = flaxnets.create("lenet")
    path = C.save_model(tmp_path / "m.flax", "lenet", m, 10)
    raw = path.read_bytes()
    cases = {"truncated": raw[:-50], "flipped": raw[:-50] + bytes([raw[-50] ^ 1]) + raw[-49:],
             "header only": raw[:20], "other": b"PK\x03\x04 a zip, not ours",
             "version": raw[:8] + bytes([9]) + raw[9:]}
    expect = {"truncated": "corrupt or truncated", "flipped": "corrupt or truncated",
              "header only": "truncated", "other": "not a flaxnets checkpoint",
              "version": "format version 9"}
    for name, data in cases.items():
        bad = tmp_path / f"{name}.flax"
        bad.write_bytes(data)
        with pytest.raises(C.CheckpointError, match=expect[name]):
            C.load(bad)


def test_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = C.atomic_write_bytes(tmp_path / "f.bin", b"old")

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(C.os, "replace", boom)
    with pytest.raises(OSError, match="No space left"):
        C.atomic_write_bytes(target, b"new" * 1000)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]  # no temporary file left behind
