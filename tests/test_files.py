"""Weight files (PyTorch pickles, safetensors): bit-exact round trips for every net, checkpoints as
found, safe and atomic I/O."""

from __future__ import annotations

import errno
import hashlib
import io
import os
import pickle
import re
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors import safe_open
from safetensors.torch import load_file

import flaxnets
import torch_ref
from parity import load_state_dict
from parity.check import randomize_torch
from parity.files import WeightsFileError, read_weights, write_weights
from scripts.convert import main

NET = "resnet20"  # the net of the CLI tests: BatchNorm, shortcuts, cheap to build and run


def random_state_dict(name: str, seed: int, num_classes: int | None = None) -> OrderedDict[str, torch.Tensor]:
    """The torch net's state_dict with every tensor random (BN statistics and counters too)."""
    g = torch.Generator().manual_seed(seed)
    out = OrderedDict()
    for k, v in torch_ref.create(name, num_classes=num_classes).state_dict().items():
        out[k] = (torch.randint(0, 10_000, v.shape, generator=g, dtype=v.dtype) if not v.is_floating_point()
                  else torch.rand(v.shape, generator=g) + 0.5 if k.endswith("running_var")
                  else torch.randn(v.shape, generator=g))
    return out


def assert_same_tensors(got: dict, want: dict) -> None:
    """Same keys, dtypes, shapes and bits."""
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(torch.as_tensor(got[k]), v), k


def flax_arrays(model: nnx.Module) -> dict[tuple, np.ndarray]:
    """Every variable of a Flax model but its RNG state (no weights file holds it) by path, as numpy
    arrays."""
    return {p: np.array(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.RngState)))}


def assert_same_arrays(got: dict, want: dict) -> None:
    """Same keys, dtypes, shapes and bits (numpy arrays)."""
    assert sorted(got) == sorted(want)
    for k, v in want.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape and np.array_equal(got[k], v), k


# --------------------------------------------------------------------------- round trips
SMALL = [n for n in flaxnets.list_nets() if flaxnets.get_spec(n).params < 2_000_000]
# resnet1202 and the DenseNets take one complete path each (the format code is the same for every
# net; the small nets take all paths). Their Flax models are abstract until the first read
# (flaxnets.create_for_loading), which keeps each to a few seconds.
BIG = [n for n in flaxnets.list_nets() if n not in SMALL]


class Chain:
    """One Flax model of ``name`` and random torch weights; ``step`` reads a file into the model,
    checks that the model holds the first read's arrays bit for bit (flax -> file -> flax), and
    writes it back out. The model starts abstract (shapes only) for the big nets, and is zeroed
    before every read but the first, so that a read that loaded nothing fails."""

    def __init__(self, name: str, tmp_path: Path):
        self.name, self.dir = name, tmp_path
        self.sd0 = random_state_dict(name, seed=1)
        self.fmodel = flaxnets.create_for_loading(name)
        self.zeros = {k: np.zeros(v.shape, v.numpy().dtype) for k, v in self.sd0.items()}
        torch.save(self.sd0, tmp_path / "start.pt")  # as a PyTorch user saves it
        self.first: dict[tuple, np.ndarray] | None = None

    def step(self, src: str, dst: str) -> Path:
        if self.first is not None:
            load_state_dict(self.fmodel, self.zeros)
        load_state_dict(self.fmodel, read_weights(self.dir / src, self.name).state_dict)
        arrays = flax_arrays(self.fmodel)
        if self.first is None:
            self.first = arrays
        else:
            assert_same_arrays(arrays, self.first)  # flax -> torch layout file -> flax
        return write_weights(self.dir / dst, self.name, self.fmodel)


@pytest.mark.parametrize("name", SMALL)
def test_round_trips_through_every_format_are_bit_exact(name, tmp_path):
    """pt -> safetensors -> pt -> safetensors -> pt: torch->flax->torch and flax->torch->flax
    through each format, every file read back into the Flax model."""
    ch = Chain(name, tmp_path)
    assert_same_tensors(load_file(ch.step("start.pt", "a.safetensors")), ch.sd0)  # torch -> flax -> torch
    back = torch.load(ch.step("a.safetensors", "b.pt"), weights_only=True)  # flax -> safetensors -> flax
    assert_same_tensors(back, ch.sd0)
    assert list(back) == list(ch.sd0)  # in torch's own key order
    torch_ref.create(name).load_state_dict(back, strict=True)
    assert_same_tensors(load_file(ch.step("b.pt", "c.safetensors")), ch.sd0)  # flax -> pt -> flax
    assert_same_tensors(torch.load(ch.step("c.safetensors", "d.pt"), weights_only=True), ch.sd0)


def test_every_net_has_a_round_trip():
    assert sorted(SMALL + BIG) == sorted(flaxnets.list_nets())
    assert {"resnet1202", "densenet121", "densenet169", "densenet201", "densenet121_se"} == set(BIG)


@pytest.mark.slow
@pytest.mark.parametrize("name", BIG)
def test_big_nets_round_trip_bit_exact_through_each_format_once(name, tmp_path):
    """The cheapest path that still has both round trips and both formats: pt -> safetensors ->
    pt (the format code is the same for every net; the small nets take all paths)."""
    ch = Chain(name, tmp_path)
    back = load_file(ch.step("start.pt", "a.safetensors"))
    assert_same_tensors(back, ch.sd0)  # torch (pt) -> flax -> torch (safetensors)
    torch_ref.create(name).load_state_dict(back, strict=True)
    ch.step("a.safetensors", "b.pt")  # flax -> torch (safetensors) -> flax


def test_every_torch_suffix_writes_a_bare_state_dict_and_content_decides_the_read_format(tmp_path):
    sd = random_state_dict(NET, seed=2)
    for suffix in [".pt", ".pth", ".th", ".bin"]:
        write_weights(tmp_path / f"m{suffix}", NET, sd)
        back = torch.load(tmp_path / f"m{suffix}", weights_only=True)
        assert type(back) is OrderedDict
        assert_same_tensors(back, sd)
    write_weights(tmp_path / "m.safetensors", NET, sd)
    (tmp_path / "m.safetensors").rename(tmp_path / "misnamed.bin")
    w = read_weights(tmp_path / "misnamed.bin", NET)
    assert w.format == "safetensors" and any("although its name says" in n for n in w.notes)
    assert_same_tensors({k: torch.from_numpy(v) for k, v in w.state_dict.items()}, sd)
    with pytest.raises(WeightsFileError, match="num_classes 7 does not fit the weights' linear.weight"):
        write_weights(tmp_path / "seven.safetensors", NET, sd, num_classes=7)
    assert not (tmp_path / "seven.safetensors").exists()


# --------------------------------------------------------------------------- the CLI, files as found
def convert(capsys, *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, out: str, err: str, *needles: str) -> None:
    assert code == 1 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


@pytest.fixture(scope="module")
def sd20() -> OrderedDict[str, torch.Tensor]:
    """resnet20 with random weights and data-calibrated BN statistics (finite, varied logits)."""
    torch.manual_seed(0)
    model = torch_ref.create(NET)
    randomize_torch(model, 0, flaxnets.get_spec(NET).check_shape)
    return model.state_dict()


def check_converted(out_path: Path, want: dict) -> None:
    """The CLI's output, read as a PyTorch user would, equals ``want`` bit for bit."""
    if out_path.suffix == ".safetensors":
        got = load_file(out_path)
    else:
        got = torch.load(out_path, weights_only=True)
    assert_same_tensors(got, want)


@pytest.mark.parametrize("key", ["state_dict", "model", "model_state_dict", "net"])
def test_a_wrapped_state_dict_is_unwrapped_and_the_rest_reported(key, sd20, tmp_path, capsys):
    src, dst = tmp_path / "ckpt.pth", tmp_path / "out.safetensors"
    optimizer = {"state": {0: {"momentum_buffer": torch.ones(3)}}, "param_groups": [{"lr": 0.1}]}
    torch.save({"epoch": 41, key: sd20, "best_acc": 0.93, "optimizer": optimizer}, src)
    code, out, err = convert(capsys, "--net", NET, src, dst)
    assert code == 0, err
    assert f"took the state_dict under '{key}'; ignored epoch, best_acc, optimizer" in out
    assert re.search(r"max\|Δ\| \S+ ≤ tolerance", out)
    check_converted(dst, sd20)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "_orig_mod.module."])
def test_dataparallel_and_compile_prefixes_are_stripped(prefix, sd20, tmp_path, capsys):
    src, dst = tmp_path / "ddp.pt", tmp_path / "out.safetensors"
    torch.save({"model_state_dict": {prefix + k: v for k, v in sd20.items()}}, src)
    code, out, err = convert(capsys, "--net", NET, src, dst)
    assert code == 0, err
    for part in prefix.split(".")[:-1]:
        assert f"stripped the prefix '{part}.' from every key" in out
    check_converted(dst, sd20)


def test_a_prefix_on_only_some_keys_is_a_strict_error(sd20, tmp_path, capsys):
    src = tmp_path / "half.pt"
    torch.save({("module." + k if k.startswith("layer1") else k): v for k, v in sd20.items()}, src)
    code, out, err = convert(capsys, "--net", NET, src, tmp_path / "out.pt")
    assert code == 1 and "unexpected: module.layer1.0.conv1.weight" in err and "Traceback" not in err
    assert not (tmp_path / "out.pt").exists()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_file_saved_on_cuda_loads_onto_the_cpu(legacy, sd20, tmp_path, capsys, monkeypatch):
    """The storages are tagged 'cuda:0' as on a GPU machine (torch.save asks location_tag)."""
    src, dst = tmp_path / "gpu.pt", tmp_path / "out.pth"
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save({"state_dict": sd20, "epoch": 3}, src, _use_new_zipfile_serialization=not legacy)
    assert b"cuda:0" in src.read_bytes()
    if not torch.cuda.is_available():  # the plain load a CPU-only user tries first fails
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(src, weights_only=True)
    code, out, err = convert(capsys, "--net", NET, src, dst)
    assert code == 0, err
    assert "tensors saved on cuda:0, loaded onto the CPU" in out
    check_converted(dst, sd20)


def test_the_legacy_non_zip_format_is_read(sd20, tmp_path, capsys):
    src, dst = tmp_path / "old.th", tmp_path / "out.safetensors"
    torch.save(sd20, src, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(src)
    code, out, err = convert(capsys, "--net", NET, src, dst)
    assert code == 0, err
    assert "legacy (pre-1.6, non-zip) torch format" in out
    check_converted(dst, sd20)


@pytest.mark.slow
def test_torchvisions_old_densenet121_checkpoint_converts(tmp_path, capsys):
    """As torchvision published densenet121 (saved before PyTorch 0.4.1): ``norm.1``-style keys,
    no ``num_batches_tracked``, legacy format. The result loads into torchvision strictly."""
    import torchvision

    torch.manual_seed(0)
    tv = torchvision.models.densenet121(weights=None)
    randomize_torch(tv, 0, (64, 64, 3))
    tv.eval()
    new = {k: v for k, v in tv.state_dict().items() if not k.endswith("num_batches_tracked")}
    old = {re.sub(r"(denselayer\d+\.(?:norm|relu|conv))([12])\.", r"\1.\2.", k): v for k, v in new.items()}
    assert sum(".norm.1." in k for k in old) == 58 * 4  # 58 dense layers, 4 tensors per norm.1
    src, dst = tmp_path / "densenet121-a639ec97.pth", tmp_path / "densenet121.safetensors"
    torch.save(old, src, _use_new_zipfile_serialization=False)
    code, out, err = convert(capsys, "--net", "densenet121", src, dst)
    assert code == 0, err
    assert "renamed 580 old-style torchvision keys (norm.1 -> norm1)" in out
    assert "added num_batches_tracked = 0 to 121 BatchNorm layers" in out
    assert "1000 classes, 7,978,856 parameters" in out
    back = load_file(dst)
    tv2 = torchvision.models.densenet121(weights=None).eval()
    tv2.load_state_dict(back, strict=True)
    assert_same_tensors({k: v for k, v in back.items() if k in new}, new)
    assert all(int(v) == 0 for k, v in back.items() if k.endswith("num_batches_tracked"))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(tv2(x), tv(x))


def test_missing_num_batches_tracked_in_a_modern_file_stays_an_error(sd20, tmp_path, capsys):
    src = tmp_path / "m.pt"
    torch.save({k: v for k, v in sd20.items() if k != "bn1.num_batches_tracked"}, src)
    code, _, err = convert(capsys, "--net", NET, src, tmp_path / "out.safetensors")
    assert code == 1 and "missing:    bn1.num_batches_tracked" in err


def test_num_classes_is_inferred_from_the_classifier(tmp_path, capsys):
    sd = random_state_dict(NET, seed=3, num_classes=7)
    src, dst = tmp_path / "seven.pt", tmp_path / "seven.safetensors"
    torch.save(sd, src)
    code, out, err = convert(capsys, "--net", NET, src, dst)
    assert code == 0, err
    assert "num_classes 7 (from linear.weight)" in out and "7 classes" in out
    with safe_open(str(dst), framework="pt") as f:
        assert f.metadata()["num_classes"] == "7"
    code, _, _ = convert(capsys, "--net", NET, "--num-classes", "7", src, tmp_path / "again.pt")
    assert code == 0
    code, _, err = convert(capsys, "--net", NET, "--num-classes", "5", src, tmp_path / "five.pt")
    assert code == 1 and "linear.weight: model expects (5, 64), state_dict has (7, 64)" in err
    assert not (tmp_path / "five.pt").exists()


def test_every_key_problem_is_listed_and_nothing_is_written(sd20, tmp_path, capsys):
    bad = OrderedDict(sd20)
    del bad["linear.bias"]
    bad["linear.extra"] = torch.zeros(2)
    bad["conv1.weight"] = torch.zeros(16, 3, 5, 5)
    src = tmp_path / "bad.pt"
    torch.save(bad, src)
    code, out, err = convert(capsys, "--net", NET, src, tmp_path / "out.pt")
    assert code == 1 and out == "" and "Traceback" not in err
    assert "1 missing, 1 unexpected, 1 shape-mismatched" in err
    assert "missing:    linear.bias" in err and "unexpected: linear.extra" in err
    assert "conv1.weight: model expects (16, 3, 3, 3), state_dict has (16, 3, 5, 5)" in err
    assert not (tmp_path / "out.pt").exists()


class CreatesFile:
    """Unpickling this opens (creates) ``path``: what a malicious checkpoint could do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_a_pickle_that_would_run_code_is_refused_and_does_not_run(how, sd20, tmp_path, capsys):
    armed = tmp_path / "proof"
    pickle.loads(pickle.dumps(CreatesFile(str(armed)), protocol=2)).close()
    assert armed.exists()  # the payload works when unpickled the unsafe way
    target, src = tmp_path / "pwned", tmp_path / "evil.pt"
    if how == "pickle":  # plain data around it: the payload is the first thing refused
        src.write_bytes(pickle.dumps({"epoch": 3, "hook": CreatesFile(str(target))}, protocol=2))
    else:
        torch.save({"state_dict": sd20, "hook": CreatesFile(str(target))}, src)
    code, out, err = convert(capsys, "--net", NET, src, tmp_path / "out.pt")
    assert_one_line_error(code, out, err, "refused", "arbitrary unpickling (it imports io.open)",
                          "weights_only=True")
    assert not target.exists() and not (tmp_path / "out.pt").exists()


def test_an_existing_output_is_only_overwritten_with_force(sd20, tmp_path, capsys):
    src, dst = tmp_path / "m.pt", tmp_path / "out.safetensors"
    torch.save(sd20, src)
    dst.write_bytes(b"keep me")
    code, out, err = convert(capsys, "--net", NET, src, dst)
    assert_one_line_error(code, out, err, "already exists", "--force")
    assert dst.read_bytes() == b"keep me"
    code, _, err = convert(capsys, "--net", NET, src, dst, "--force")
    assert code == 0, err
    check_converted(dst, sd20)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_a_failure_during_the_write_leaves_no_partial_output(suffix, sd20, tmp_path, capsys, monkeypatch):
    src, dst, new = tmp_path / "m.pt", tmp_path / f"old{suffix}", tmp_path / f"new{suffix}"
    torch.save(sd20, src)
    dst.write_bytes(b"the previous file")

    def disk_full(fd):  # the bytes are in the temporary file; making them durable fails
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", disk_full)
    code, out, err = convert(capsys, "--net", NET, src, dst, "--force")
    assert_one_line_error(code, out, err, "No space left on device")
    assert dst.read_bytes() == b"the previous file"
    code, out, err = convert(capsys, "--net", NET, src, new)
    assert_one_line_error(code, out, err, "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([src.name, dst.name])  # no temp files


def test_logits_beyond_the_tolerance_are_an_error_and_nothing_is_written(sd20, tmp_path, capsys, monkeypatch):
    import parity.comparison as comparison  # where convert_file's eval-logit comparison runs

    src = tmp_path / "m.pt"
    torch.save(sd20, src)
    real = comparison.flax_logits
    monkeypatch.setattr(comparison, "flax_logits", lambda model, x, jit=False: real(model, x, jit) + 1e-3)
    code, out, err = convert(capsys, "--net", NET, src, tmp_path / "out.safetensors")
    assert_one_line_error(code, out, err, "logits differ by 1.00e-03 > tolerance")
    assert not (tmp_path / "out.safetensors").exists()


def test_outputs_carry_the_source_name_and_sha256(sd20, tmp_path, capsys):
    src = tmp_path / "published.bin"
    torch.save({"net": sd20}, src)
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    assert convert(capsys, "--net", NET, src, tmp_path / "m.safetensors")[0] == 0
    with safe_open(str(tmp_path / "m.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta == {"format": "pt", "net": NET, "num_classes": "10", "source": "published.bin",
                    "source_sha256": sha}
    assert convert(capsys, "--net", NET, tmp_path / "m.safetensors", tmp_path / "again.safetensors")[0] == 0
    with safe_open(str(tmp_path / "again.safetensors"), framework="pt") as f:
        again = f.metadata()
    assert again["source"] == "m.safetensors"
    assert again["source_sha256"] == hashlib.sha256((tmp_path / "m.safetensors").read_bytes()).hexdigest()


def test_a_flax_file_is_one_line_error_naming_the_weights_formats(sd20, tmp_path, capsys):
    """.flax is not a weights file format, neither to read nor to write."""
    supported = "PyTorch (.pt, .pth, .th, .bin) or safetensors (.safetensors)"
    src = tmp_path / "m.pt"
    torch.save(sd20, src)
    code, out, err = convert(capsys, "--net", NET, src, tmp_path / "out.flax")
    assert_one_line_error(code, out, err, "unknown weights file type '.flax'", supported)
    assert not (tmp_path / "out.flax").exists()
    old = tmp_path / "best.flax"
    old.write_bytes(b"FLAXNETS\x01" + bytes(64))  # a single-file flaxnets checkpoint's header
    code, out, err = convert(capsys, "--net", NET, old, tmp_path / "out.pt")
    assert_one_line_error(code, out, err, f"{old} is not a weights file of a supported format", supported)
    with pytest.raises(WeightsFileError, match=re.escape(supported)):
        read_weights(old, NET)


def test_unreadable_inputs_are_one_line_errors(sd20, tmp_path, capsys):
    text, no_sd, st = tmp_path / "notes.pt", tmp_path / "stats.pt", tmp_path / "m.safetensors"
    text.write_text("not weights\n")
    torch.save({"epoch": 3, "ema": {"decay": 0.99}}, no_sd)
    write_weights(st, NET, sd20)
    cases = [
        (["--net", "resnet21", text, "o.pt"], "unknown net 'resnet21'; valid nets: lenet"),
        (["--net", NET, tmp_path / "missing.pt", "o.pt"], "No such file or directory"),
        (["--net", NET, text, "o.pt"], "is not a weights file of a supported format: PyTorch"),
        (["--net", NET, no_sd, "o.pt"], "no state_dict found: the dict holds epoch (int), ema (dict)"),
        (["--net", "resnet32", st, "o.pt"], "holds 'resnet20' weights (its metadata says), not 'resnet32'"),
        (["--net", NET, st, tmp_path / "o.npz"], "unknown weights file type '.npz'"),
    ]
    for argv, needle in cases:
        assert_one_line_error(*convert(capsys, *argv), needle)


def test_torch_files_are_written_without_torch_and_torch_reads_them(tmp_path):
    """parity.torchfile: every dtype, 0-d and empty tensors, a non-contiguous array; the records
    torch.save writes, storages aligned for mmap; equal weights give equal bytes."""
    from parity.torchfile import ALIGN, torch_save_bytes

    rng = np.random.default_rng(0)
    sd = OrderedDict(
        w=rng.normal(size=(3, 4, 5, 6)).astype(np.float32), t=rng.normal(size=(4, 5)).astype(np.float32).T,
        n=np.array(7, np.int64), e=np.zeros((0, 3), np.float32), b=np.array([True, False]),
        h=np.ones(3, np.float16), d=rng.normal(size=2), i=np.arange(3, dtype=np.int32),
        s=np.arange(-2, 2, dtype=np.int16), c=np.arange(-2, 2, dtype=np.int8), u=np.arange(3, dtype=np.uint8))
    data = torch_save_bytes(sd)
    assert data == torch_save_bytes(OrderedDict((k, v.copy()) for k, v in sd.items()))
    (tmp_path / "m.pt").write_bytes(data)
    for mmap in (False, True):
        back = torch.load(tmp_path / "m.pt", weights_only=True, mmap=mmap)
        assert type(back) is OrderedDict and list(back) == list(sd)
        for k, v in sd.items():
            assert back[k].numpy().dtype == v.dtype and tuple(back[k].shape) == v.shape, k
            np.testing.assert_array_equal(back[k].numpy(), v)
    ref = io.BytesIO()
    torch.save(OrderedDict((k, torch.from_numpy(np.array(v, order="C"))) for k, v in sd.items()), ref)
    ours = zipfile.ZipFile(io.BytesIO(data))
    assert ours.namelist() == zipfile.ZipFile(ref).namelist()
    for info in ours.infolist():
        assert (info.header_offset + 30 + len(info.filename) + len(info.extra)) % ALIGN == 0
    with pytest.raises(TypeError, match="x: no torch storage for dtype complex64"):
        torch_save_bytes({"x": np.zeros(2, np.complex64)})
    code = ("import sys, numpy as np; from parity.files import write_weights; "
            f"write_weights({str(tmp_path / 'lenet.pt')!r}, 'lenet', "
            "{k: np.zeros(s, np.float32) for k, s in [('conv.0.weight', (6, 1, 5, 5)), "
            "('conv.0.bias', (6,)), ('conv.3.weight', (16, 6, 5, 5)), ('conv.3.bias', (16,)), "
            "('fc.0.weight', (120, 256)), ('fc.0.bias', (120,)), ('fc.2.weight', (84, 120)), "
            "('fc.2.bias', (84,)), ('fc.4.weight', (10, 84)), ('fc.4.bias', (10,))]}); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr[-2000:]
    torch_ref.create("lenet").load_state_dict(torch.load(tmp_path / "lenet.pt", weights_only=True), strict=True)
