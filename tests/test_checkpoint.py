"""flaxnets.checkpoint: orbax checkpoint directories that round-trip the training state exactly,
refuse what does not fit, turn damage into one clear error and survive a kill during a save."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

import flaxnets
from flaxnets import checkpoint as C
from flaxnets.engine import JaxEngine, data_mesh, make_optimizer, replicate
from flaxnets.recipes import recipe_for

ROOT = Path(__file__).resolve().parents[1]


def engine_state(name: str, seed: int, shift: float = 0.0) -> tuple[JaxEngine, object]:
    """A JaxEngine holding ``name``'s full training state, placed as the engine places it.

    Only the attributes the checkpoint methods read are set: a real engine compiles its steps
    (seconds per net), which these tests do not need. ``shift`` moves every float and integer
    leaf off its initial value, so that a round trip cannot pass by re-initialising.
    """
    model = flaxnets.create(name, num_classes=2, seed=seed)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    recipe = recipe_for(name, optimizer="adam")  # adam: two moment slots and a step count
    tx = make_optimizer(recipe, steps_per_epoch=10)[0]
    state = ((params, rest), tx.init(params))
    if shift:
        state = jax.tree.map(lambda a: a if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key)
                             else a + np.asarray(shift).astype(a.dtype), state)
    state = replicate(state, NamedSharding(data_mesh(), P()))
    engine = object.__new__(JaxEngine)
    engine.name, engine.num_classes, engine.recipe, engine.steps = name, 2, recipe, 10
    engine.model = model
    (engine.state, engine.opt_state) = state
    return engine, state


def bits(tree: object) -> list[tuple[str, str, bytes]]:
    """Every leaf as (dtype, shape, raw bytes); PRNG keys as their key data."""
    out = []
    for a in jax.tree.leaves(tree):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            out.append(("key:" + str(jax.random.key_impl(a)), "", np.asarray(jax.random.key_data(a)).tobytes()))
        else:
            out.append((str(a.dtype), str(a.shape), np.asarray(a).tobytes()))
    return out


@pytest.mark.parametrize("name", ["net_dropout", "net_batchnorm"])
def test_the_full_training_state_round_trips_bit_exactly(name, tmp_path):
    """Params, BatchNorm statistics with num_batches_tracked, dropout RNG keys and counts, and the
    optimiser state come back bit for bit, into an engine initialised differently."""
    saver, state = engine_state(name, seed=1, shift=3.0)
    meta = {"epoch": 2, "metrics": [{"epoch": 1, "lr": 0.1}], "recipe": {"milestones": (1, 2)}}
    path = saver.save_state(state, tmp_path / "last", meta)
    assert C.steps(path) == [2]
    loader, fresh = engine_state(name, seed=7)
    assert bits(fresh) != bits(state)
    back, got = loader.load_state(path)
    assert jax.tree.structure(back) == jax.tree.structure(state)
    assert bits(back) == bits(state)
    assert got == {**meta, "recipe": {"milestones": [1, 2]}, "net": name, "num_classes": 2}
    assert all(a.sharding == b.sharding for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(state)))
    stored, _ = C.load(path)  # no template: numpy arrays by name, keys as key data
    layer = "conv1_dropout" if name == "net_dropout" else "conv1_batchnorm"
    names = C.flatten(stored)
    assert {"model/conv1/kernel", "opt/0/mu/conv1/kernel", "opt/0/nu/fc2/bias", "opt/0/count"} <= set(names)
    if name == "net_dropout":
        assert names[f"model/{layer}/rngs/key"].dtype == np.uint32
        assert f"model/{layer}/rngs/count" in names
    else:
        assert names[f"model/{layer}/num_batches_tracked"] == 3  # shifted from 0
    assert all(isinstance(v, np.ndarray) for v in names.values())


def test_another_net_or_class_count_is_refused(tmp_path):
    saver, state = engine_state("net_dropout", seed=0)
    path = saver.save_state(state, tmp_path / "last", {"epoch": 1})
    other, _ = engine_state("net_batchnorm", seed=0)
    with pytest.raises(C.CheckpointError, match=r"is a checkpoint of 'net_dropout' with 2 classes, "
                                                 r"not 'net_batchnorm' with 2"):
        other.load_state(path)
    other.name = "net_dropout"  # the right name on the wrong arrays: every difference is listed
    with pytest.raises(C.CheckpointError) as e:
        other.load_state(path)
    msg = str(e.value)
    assert msg.startswith(f"the arrays of {path / '1'} do not fit:")
    assert "missing: model/conv1_batchnorm/mean" in msg and "unexpected: model/conv1_dropout/rngs/key" in msg


def test_a_new_step_replaces_the_old_one_and_a_new_run_replaces_a_longer_one(tmp_path):
    tree = {"w": jax.numpy.arange(6.0)}
    for step in (1, 2, 3):
        C.save(tmp_path / "ck", tree, {"epoch": step}, step=step)
        assert C.steps(tmp_path / "ck") == [step]  # one step kept
    C.save(tmp_path / "ck", {"w": jax.numpy.zeros(6)}, {"epoch": 1}, step=1)
    assert C.steps(tmp_path / "ck") == [1]
    assert C.read_meta(tmp_path / "ck") == (1, {"epoch": 1})
    assert not C.exists(tmp_path / "nothing") and not C.exists(tmp_path)


def _saved(tmp_path: Path) -> tuple[Path, dict]:
    rng = np.random.default_rng(0)
    tree = {"model": {"w": jax.numpy.asarray(rng.normal(size=(300, 200)).astype(np.float32)),
                      "b": jax.numpy.asarray(rng.normal(size=(7,)).astype(np.float32))},
            "key": jax.random.key(3)}
    return C.save(tmp_path / "orig", tree, {"epoch": 1}, step=1), tree


def _largest_file(d: Path) -> Path:
    return max((p for p in d.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _damage(kind: str, step_dir: Path) -> None:
    data = _largest_file(step_dir / "state")  # the array chunks
    if kind == "truncated":
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    elif kind == "flipped":  # a flipped bit in the chunk data: tensorstore alone loads it
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0x10
        data.write_bytes(bytes(raw))
    elif kind == "metadata":
        meta = step_dir / "state" / "_METADATA"
        meta.write_text(meta.read_text()[:100])
    elif kind == "no state":
        import shutil

        shutil.rmtree(step_dir / "state")
    elif kind == "empty meta":
        (step_dir / "meta" / "metadata").write_text("")
    elif kind == "foreign":
        (step_dir / "integrity" / "metadata").write_text('{"format": "something else"}')
    elif kind == "version":
        (step_dir / "integrity" / "metadata").write_text(
            '{"format": "flaxnets-jax-checkpoint", "version": 9}')


DAMAGE = {"truncated": "is corrupt or truncated", "flipped": r"is corrupt or truncated \(model/w: "
          "checksum mismatch\\)", "metadata": "is corrupt or truncated",
          "no state": r"is incomplete or not a flaxnets JAX checkpoint \(no state/\)",
          "empty meta": "is corrupt or truncated", "foreign": "is not a flaxnets JAX checkpoint",
          "version": "has checkpoint format version 9; this flaxnets reads version 1"}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_checkpoint_is_one_clear_error(kind, tmp_path, capfd):
    import shutil

    orig, tree = _saved(tmp_path)
    template = jax.tree.map(lambda a: a, tree)
    path = tmp_path / kind.replace(" ", "_")
    shutil.copytree(orig, path)
    _damage(kind, path / "1")
    with pytest.raises(C.CheckpointError, match=DAMAGE[kind]) as e:
        C.load(path, template)
    msg = str(e.value)
    assert msg.startswith(f"{path / '1'} ") and "\n" not in msg and len(msg) < 400, msg
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    back, _ = C.load(orig, template)  # the undamaged copy loads, keys as keys
    assert bits(back) == bits(tree)


def test_what_is_not_a_checkpoint(tmp_path):
    with pytest.raises(C.CheckpointError, match=f"{tmp_path / 'none'}: no such directory"):
        C.load(tmp_path / "none")
    (tmp_path / "last.pt").write_bytes(b"PK")
    with pytest.raises(C.CheckpointError, match="last.pt: not a checkpoint directory"):
        C.load(tmp_path / "last.pt")
    (tmp_path / "empty" / "1.orbax-checkpoint-tmp").mkdir(parents=True)  # an unfinished save only
    with pytest.raises(C.CheckpointError, match="empty: no finished checkpoint"):
        C.read_meta(tmp_path / "empty")


KILL = {
    # the arrays of step 2 written, half of their largest file cut, before orbax commits the step
    "before the commit": (
        "real = os.rename\n"
        "def rename(src, dst):\n"
        "    if src.endswith('2.orbax-checkpoint-tmp/state.orbax-checkpoint-tmp'):\n"
        "        big = max((p for p in pathlib.Path(src).rglob('*') if p.is_file()), key=lambda p: p.stat().st_size)\n"
        "        os.truncate(big, big.stat().st_size // 2)\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(src, dst)\n"
        "os.rename = rename\n"),
    # step 2 committed, step 1 half deleted
    "while deleting the old step": (
        "real = shutil.rmtree\n"
        "def rmtree(path, *a, **k):\n"
        "    if str(path).endswith('/ck/1'):\n"
        "        os.remove(max((p for p in pathlib.Path(path).rglob('*') if p.is_file()), key=lambda p: p.stat().st_size))\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return real(path, *a, **k)\n"
        "shutil.rmtree = rmtree\n"),
}


@pytest.mark.parametrize("when", list(KILL))
def test_a_kill_during_a_save_leaves_a_loadable_checkpoint(when, tmp_path):
    """SIGKILL in the middle of saving step 2: step 1 (or the finished step 2) loads, and the
    next save clears what the killed one left."""
    code = ("import os, pathlib, shutil, signal, sys, jax, numpy as np\n"
            "from flaxnets import checkpoint as C\n"
            "path = pathlib.Path(sys.argv[1])\n"
            "def tree(v): return {'w': jax.numpy.full((256, 256), v, np.float32), 'k': jax.random.key(int(v))}\n"
            "C.save(path, tree(1.0), {'epoch': 1}, step=1)\n"
            f"{KILL[when]}"
            "C.save(path, tree(2.0), {'epoch': 2}, step=2)\n")
    ck = tmp_path / "ck"
    p = subprocess.run([sys.executable, "-c", code, str(ck)], cwd=ROOT, capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert p.returncode == -9, p.stderr[-3000:]
    template = {"w": jax.numpy.zeros((256, 256)), "k": jax.random.key(0)}
    survivor = 1 if when == "before the commit" else 2
    if survivor == 1:
        assert [d.name for d in ck.iterdir() if "tmp" in d.name] == ["2.orbax-checkpoint-tmp"]
    tree, meta = C.load(ck, template)
    assert meta == {"epoch": survivor} and float(tree["w"][0, 0]) == survivor
    C.save(ck, {"w": jax.numpy.full((256, 256), 3.0), "k": jax.random.key(3)}, {"epoch": 3}, step=3)
    assert sorted(d.name for d in ck.iterdir() if not d.name.startswith("_")) == ["3"]
    assert C.load(ck, template)[1] == {"epoch": 3}


def test_a_failed_file_write_keeps_the_old_file(tmp_path, monkeypatch):
    """The torch engine's .pt checkpoints (and the run's files) go through atomic_write_bytes."""
    from flaxnets import runs

    target = runs.atomic_write_bytes(tmp_path / "f.bin", b"old")

    def boom(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runs.os, "replace", boom)
    with pytest.raises(OSError, match="No space left"):
        runs.atomic_write_bytes(target, b"new" * 1000)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]  # no temporary file left behind
