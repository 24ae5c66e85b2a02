"""The benchmark (``benchmarks``): the interleaving, FLOP counts checked by hand, the tables,
bench.json from scripts/bench.py, the docs section the report fills, the tutorial's loop."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks import e2e, flops, report, throughput
from flaxnets import xla_cpu
from flaxnets.xla_cpu import onednn

ROOT = Path(__file__).resolve().parents[1]


def test_lenet_forward_flops_equal_a_hand_count():
    macs = (6 * 24 * 24 * (1 * 5 * 5)  # conv1: 6 maps of 24x24, each a 1x5x5 window
            + 16 * 8 * 8 * (6 * 5 * 5)  # conv2 on the pooled 6x12x12: 16 maps of 8x8
            + 256 * 120 + 120 * 84 + 84 * 10)  # the three linear layers
    assert flops.forward_flops("lenet", (28, 28, 1)) == 2 * macs == 563_280


def test_cifar2_net_forward_flops_equal_a_hand_count():
    macs = 16 * 32 * 32 * (3 * 3 * 3) + 8 * 16 * 16 * (16 * 3 * 3) + 512 * 32 + 32 * 2  # padded 3x3 convs
    assert flops.forward_flops("net", (32, 32, 3)) == 2 * macs


class FakeEngine:
    """Records the order of train_epoch calls; fails or hangs on request."""

    compile_seconds = 1.5

    def __init__(self, variant, calls, fail_at=None, hang=False):
        self.variant, self.calls, self.fail_at, self.hang = variant, calls, fail_at, hang

    def train_epoch(self, epoch):
        self.calls.append((self.variant, epoch))
        if self.hang:
            try:
                time.sleep(30)
            except throughput.CompileTimeout as e:  # as inductor does: wrapped in its own error
                raise RuntimeError("InductorError") from e
        if epoch == self.fail_at:
            raise RuntimeError("boom\nsecond line")


def test_variants_are_interleaved_and_failures_reported_per_variant(monkeypatch):
    calls = []
    behaviour = {"jax": {}, "torch": {"fail_at": 2}, "torch_cl": {}, "torch_compile": {"hang": True}}
    monkeypatch.setattr(throughput, "build_engine",
                        lambda v, *a: FakeEngine(v, calls, **behaviour[v]))
    case = throughput.Case("lenet", 4, (28, 28, 1), 2)
    row = throughput.measure_case(case, repeats=2, warmup=1, compile_timeout=0.2)
    assert calls == [("jax", 0), ("torch", 0), ("torch_cl", 0), ("torch_compile", 0),
                     ("jax", 1), ("torch", 1), ("torch_cl", 1),
                     ("jax", 2), ("torch", 2), ("torch_cl", 2)]
    v = row["variants"]
    assert v["torch"]["status"] == "failed: RuntimeError: boom"
    assert v["torch_compile"]["status"].startswith("timeout: ")
    for ok in ("jax", "torch_cl"):
        assert v[ok]["status"] == "ok" and len(v[ok]["warmup_seconds"]) == 1 and len(v[ok]["seconds"]) == 2
        assert v[ok]["median_images_per_s"] > 0 and "median_images_per_s" not in v["torch"]
    assert v["jax"]["compile_seconds"] == 1.5



def test_a_timed_round_trains_back_to_back_epochs_as_long_as_asked(monkeypatch):
    """A fake clock: each jax epoch takes 0.1 s, torch-CL's 0.3 s. Rounds of 0.25 s take
    ceil(0.25 / 0.1) = 3 epochs of each variant in a row, numbered on; seconds are per epoch."""
    clock = [0.0]
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: clock[0])
    calls = []

    class Timed(FakeEngine):
        def train_epoch(self, epoch):
            clock[0] += {"jax": 0.1, "torch_cl": 0.3}[self.variant]
            super().train_epoch(epoch)

    monkeypatch.setattr(throughput, "build_engine", lambda v, *a: Timed(v, calls))
    case = throughput.Case("lenet", 4, (28, 28, 1), 2)
    row = throughput.measure_case(case, ("jax", "torch_cl"), repeats=2, warmup=1, round_seconds=0.25)
    assert row["epochs_per_round"] == 3
    assert calls == [("jax", 0), ("torch_cl", 0), *[("jax", e) for e in (1, 2, 3)],
                     *[("torch_cl", e) for e in (1, 2, 3)], *[("jax", e) for e in (4, 5, 6)],
                     *[("torch_cl", e) for e in (4, 5, 6)]]
    v = row["variants"]
    assert v["jax"]["seconds"] == pytest.approx([0.1, 0.1])
    assert v["torch_cl"]["seconds"] == pytest.approx([0.3, 0.3])
    assert v["jax"]["median_images_per_s"] == pytest.approx(8 / 0.1)
    assert throughput.epochs_per_round([0.3, 0.1], 0.0) == 1 and throughput.epochs_per_round([2.0], 0.5) == 1


def test_settling_epochs_keep_the_switch_between_variants_out_of_the_timing(monkeypatch):
    """A fake clock where a variant's first epoch after another variant ran costs 1 s more:
    one untimed epoch per round leaves exactly the steady per-epoch times."""
    clock, calls = [0.0], []

    class Switching(FakeEngine):
        def train_epoch(self, epoch):
            clock[0] += 0.1 + (1.0 if calls and calls[-1][0] != self.variant else 0.0)
            super().train_epoch(epoch)

    monkeypatch.setattr(throughput.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(throughput, "build_engine", lambda v, *a: Switching(v, calls))
    case = throughput.Case("lenet", 4, (28, 28, 1), 2)
    settled = throughput.measure_case(case, ("jax", "torch_cl"), repeats=2, settle=1)
    assert [c[1] for c in calls] == [0, 0, 1, 2, 1, 2, 3, 4, 3, 4]  # settle, timed; per variant
    for v in settled["variants"].values():
        assert v["seconds"] == pytest.approx([0.1, 0.1])
    calls.clear()
    unsettled = throughput.measure_case(case, ("jax", "torch_cl"), repeats=2, settle=0)
    assert unsettled["variants"]["jax"]["seconds"] == pytest.approx([1.1, 1.1])


def test_the_ablated_engine_is_traced_without_the_named_speedups(monkeypatch):
    import importlib

    pool = importlib.import_module("flaxnets.xla_cpu.pool")  # the module; xla_cpu.pool is its function

    pooled = []
    real = pool._windows  # what a tiled max pool reshapes with
    monkeypatch.setattr(pool, "_windows", lambda *a: pooled.append(1) or real(*a))
    case = throughput.make_case("net", steps=1, batch=8)
    splits = throughput.synthetic_splits(case, 2)
    throughput.build_engine("jax", case, splits, 2, 0, without=("tiled_pools",))  # ignored: not ABLATED
    assert pooled  # net's two 2x2 max pools, tiled on the CPU
    pooled.clear()
    engine = throughput.build_engine(throughput.ABLATED, case, splits, 2, 0, without=("tiled_pools",))
    assert pooled == [] and xla_cpu.speedup_on("tiled_pools")  # traced without; switched back on after
    engine.train_epoch(0)
    with pytest.raises(ValueError, match="unknown speed-up 'fast'; valid: scanned_stages"):
        throughput.build_engine(throughput.ABLATED, case, splits, 2, 0, without=("fast",))


def test_the_ablation_table_gives_each_nets_speedup(monkeypatch):
    built = []
    monkeypatch.setattr(throughput, "build_engine",
                        lambda v, *a: built.append((v, a[-1])) or FakeEngine(v, []))
    case = throughput.Case("lenet", 4, (28, 28, 1), 2)
    row = throughput.measure_case(case, ("jax", throughput.ABLATED), repeats=1, without=("tiled_pools",))
    assert built == [("jax", ("tiled_pools",)), (throughput.ABLATED, ("tiled_pools",))]
    for v, seconds in (("jax", 2.0), (throughput.ABLATED, 3.0)):
        row["variants"][v].update(seconds=[seconds], median_images_per_s=600.0 / seconds)
    throughput.summarise(row, peak_flops=1e9)
    assert row["jax_over_ablated"] == 1.5 and row["jax_over_best_eager"] is None
    text = report.format_ablation({"settings": {"without": ["tiled_pools"]}, "nets": [row]})
    assert "| net | JAX img/s | JAX without tiled_pools img/s | speed-up |" in text
    assert "| lenet | 300 | 200 | 1.50× | 1.5 / 1.5 |" in text


def test_each_precision_asked_for_is_a_row_of_its_own_built_in_it(monkeypatch):
    from benchmarks import cli

    built = []
    monkeypatch.setattr(throughput, "build_engine",
                        lambda v, case, *a, **k: built.append((v, case.precision)) or FakeEngine(v, []))
    monkeypatch.setattr(cli, "matmul_peak", lambda n: {"n": n, "peak_flops": 1e9, "peak_from": "fake",
                                                       "jax": {"flops": 1e9}, "torch": {"flops": 1e9}})
    args = cli.parse_args(["--nets", "lenet", "--precision", "fp32", "bf16", "--steps", "1",
                           "--repeats", "1", "--no-e2e", "--compile-nets", "none", "--round-seconds", "0"])
    rep = cli.run(args)
    assert [row["precision"] for row in rep["nets"]] == ["fp32", "bf16"]
    assert {p for _, p in built} == {"fp32", "bf16"} and ("jax", "bf16") in built
    rows = [ln for ln in report.format_table(rep).splitlines() if ln.startswith("| lenet")]
    assert [r.split(" | ")[0] for r in rows] == ["| lenet", "| lenet (bf16)"]
    with pytest.raises(SystemExit):
        cli.parse_args(["--precision", "fp16", "--no-e2e"])


def test_jax_over_pytorch_pairs_the_rounds():
    """The machine slows in round 3: each round's torch / JAX time is 3.0, 1.1, 1.1 -> 1.1,
    where the ratio of the medians (2.2 / 2) would say 1.5. The best eager variant is the one
    with the best median (torch-CL here, though plain torch wins round 2)."""
    ok = {"status": "ok"}
    row = {"net": "net", "input": [32, 32, 3], "batch": 2, "variants": {
        "jax": dict(ok, seconds=[1.0, 2.0, 10.0]), "torch": dict(ok, seconds=[30.0, 2.0, 30.0]),
        "torch_cl": dict(ok, seconds=[3.0, 2.2, 11.0])}}
    for v in row["variants"].values():
        v["median_images_per_s"] = 1 / float(np.median(v["seconds"]))
    throughput.summarise(row, peak_flops=1e9)
    assert row["jax_over_best_eager"] == pytest.approx(1.1)
    assert row["jax_over_ablated"] is None


@pytest.mark.slow
def test_bench_script_prints_the_table_and_writes_bench_json_from_any_directory(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "bench.py"), "--nets", "net", "--batch", "16",
           "--steps", "2", "--repeats", "1", "--no-e2e", "--compile-nets", "none", "--peak-size", "256",
           "--torch-threads", "1", "--round-seconds", "0.05", "--settle", "1", "--out", "bench.json"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)  # not the repo
    assert proc.returncode == 0, proc.stderr[-2000:]

    report = json.loads(out.read_text())
    assert report["machine"]["cpu"] and report["machine"]["cores"] >= 1
    assert report["machine"]["torch_threads"] == 1
    on = xla_cpu.speedup_on("onednn_convs") and onednn.available()
    assert report["machine"]["onednn_convs"] == (onednn.version() if on else "off")
    assert {"jax", "torch", "torchvision"} <= set(report["machine"]["versions"])
    assert report["e2e"] is None and report["settings"]["steps"] == 2
    assert report["settings"]["round_seconds"] == 0.05 and report["settings"]["settle"] == 1
    peak = report["peak"]
    assert peak["peak_flops"] == max(peak["jax"]["flops"], peak["torch"]["flops"]) > 0
    (row,) = report["nets"]
    assert (row["net"], row["batch"], row["input"], row["steps"]) == ("net", 16, [32, 32, 3], 2)
    assert set(row["variants"]) == {"jax", "torch", "torch_cl"}
    ips = {}
    for name, v in row["variants"].items():
        assert v["status"] == "ok" and len(v["seconds"]) == 1 and len(v["warmup_seconds"]) == 1
        assert v["median_images_per_s"] == pytest.approx(32 / v["seconds"][0])
        ips[name] = v["median_images_per_s"]
    assert row["train_flops_per_step"] == 3 * 16 * flops.forward_flops("net", (32, 32, 3))
    assert row["jax_over_best_eager"] == pytest.approx(ips["jax"] / max(ips["torch"], ips["torch_cl"]))
    assert row["percent_of_peak"]["jax"] == pytest.approx(
        100 * ips["jax"] * row["train_flops_per_image"] / peak["peak_flops"])

    lines = proc.stdout.splitlines()
    assert lines[0] == ("| net | batch | input | JAX img/s | torch img/s | torch-CL img/s | "
                        "torch.compile img/s | JAX ÷ best PyTorch eager | % of peak J / best T | "
                        "compile s J / TC |")
    (cells,) = [line.split(" | ") for line in lines if line.startswith("| net | 16 |")]
    assert cells[2:4] == ["32×32×3", f"{ips['jax']:,.0f}"]
    assert cells[6] == "not run" and cells[7] == f"{row['jax_over_best_eager']:.2f}×"
    assert any(line.startswith("Peak FP32 matmul (256×256)") for line in lines)
    k = row["epochs_per_round"]
    assert k >= 1 and any(("one epoch per variant" if k == 1 else f"(net {k})") in line for line in lines)


def test_torchvision_reads_the_prepared_fashion_mnist_root(tmp_path):
    import torchvision

    from flaxnets.data import write_idx

    src = tmp_path / "debian"
    src.mkdir()
    images = {"train": np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256, "t10k": np.full((2, 28, 28), 7)}
    for split, x in images.items():
        write_idx(src / f"{split}-images-idx3-ubyte.gz", x)
        write_idx(src / f"{split}-labels-idx1-ubyte.gz", np.arange(len(x)) + 1)
    root = e2e.torchvision_fashion_root(src, tmp_path / "root")
    train = torchvision.datasets.FashionMNIST(root=root, train=True, download=False)
    test = torchvision.datasets.FashionMNIST(root=root, train=False, download=False)
    assert len(train) == 3 and len(test) == 2
    assert np.array_equal(np.asarray(train[1][0]), images["train"][1]) and train[1][1] == 2


def test_end_to_end_table_says_whether_the_goal_is_met():
    runs = {"jax": {"label": "J", "status": "ok", "wall_seconds": 50.0, "test_acc": 0.76},
            "torch": {"label": "T", "status": "failed (exit 1): boom", "wall_seconds": 3.0},
            "material": {"label": "M", "status": "ok", "wall_seconds": 120.0, "test_acc": 0.759}}
    text = report.format_e2e(runs)
    assert "| J | 50.0 | 0.7600 | 2.40× |" in text and "| T | 3.0 | failed (exit 1): boom | — |" in text
    assert "| M | 120.0 | 0.7590 | 1.00× |" in text
    assert "first run: met — 2.40×, accuracy 0.7600 vs 0.7590" in text and "cached" not in text
    runs["jax"]["test_acc"] = 0.75
    assert "first run: not met — 2.40×" in report.format_e2e(runs)
    runs["jax"].update(test_acc=0.76, wall_seconds=61.0)
    runs["jax_warm"] = {"label": "W", "status": "ok", "wall_seconds": 40.0, "test_acc": 0.76}
    text = report.format_e2e(runs)
    assert "first run: not met — 1.97×" in text and "compilation cached: met — 3.00×" in text


KEPT_RUNS = sorted((ROOT / "benchmarks" / "results").glob("*.json"))
KEPT_RUN = ROOT / "benchmarks" / "results" / "amd-epyc-2c-2026-12-02-lenet-resnet20.json"


@pytest.mark.parametrize("path", KEPT_RUNS, ids=[p.stem for p in KEPT_RUNS])
def test_the_report_renders_each_kept_run_under_its_file_name(path):
    kept = json.loads(path.read_text())
    lines = report.render([path]).splitlines()
    assert lines[0] == f"From `benchmarks/results/{path.name}` ({kept['wall_seconds']:.0f} s in all):"
    assert "\n".join(lines[2:]) == report.format_table(kept)
    for row in kept["nets"]:
        jax_cell = report.variant_cell(row["variants"]["jax"])
        label = row["net"] + (f" ({row['precision']})" if row.get("precision", "fp32") != "fp32" else "")
        assert any(line.startswith(f"| {label} | {row['batch']} | {'×'.join(map(str, row['input']))} "
                                   f"| {jax_cell} |") for line in lines)


def test_the_report_renders_several_runs_in_order():
    assert KEPT_RUN in KEPT_RUNS
    text = report.render([KEPT_RUN, KEPT_RUN])
    assert text.count(f"From `benchmarks/results/{KEPT_RUN.name}`") == 2
    assert text == report.render([KEPT_RUN]) + "\n\n" + report.render([KEPT_RUN])


DOC = "# Benchmarks\n\nMethod.\n\n<!-- bench:begin -->\nold table\n<!-- bench:end -->\n\nEarlier runs.\n"


def test_write_fills_only_the_section_between_the_markers(tmp_path, capsys):
    doc = tmp_path / "benchmarks.md"
    doc.write_text(DOC)
    assert report.main([str(KEPT_RUN), "--write", str(doc)]) == 0
    text = doc.read_text()
    head, tail = DOC.split("old table\n")
    assert text.startswith(head) and text.endswith(tail) and "old table" not in text
    body = text[len(head):-len(tail)].splitlines()
    assert body[0] == (f"<!-- made by: python -m benchmarks.report benchmarks/results/{KEPT_RUN.name} "
                       f"--write {doc} -->")
    assert "\n".join(body[1:]) == report.render([KEPT_RUN])
    assert report.main([str(KEPT_RUN), "--write", str(doc)]) == 0
    assert doc.read_text() == text  # rewriting gives the same file
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("doc", [
    "# Benchmarks\n\nno section\n",
    "<!-- bench:begin -->\nonly the start\n",
    "<!-- bench:end -->\nreversed\n<!-- bench:begin -->\n",
    "<!-- bench:begin -->\na\n<!-- bench:end -->\n<!-- bench:begin -->\nb\n<!-- bench:end -->\n",
    "text <!-- bench:begin -->\nnot on lines of their own <!-- bench:end -->\n",
])
def test_write_refuses_a_file_without_one_marked_section_and_leaves_it(tmp_path, capsys, doc):
    path = tmp_path / "benchmarks.md"
    path.write_text(doc)
    assert report.main([str(KEPT_RUN), "--write", str(path)]) == 1
    assert path.read_text() == doc
    (err,) = capsys.readouterr().err.splitlines()
    assert err.startswith(f"error: {path} needs one line <!-- bench:begin --> and, after it, one line "
                          "<!-- bench:end -->")


def test_the_report_command_runs_as_a_module(tmp_path):
    path = tmp_path / "no-section.md"
    path.write_text("nothing to fill\n")
    cmd = [sys.executable, "-m", "benchmarks.report", str(KEPT_RUN), "--write", str(path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
    proc = subprocess.run(cmd[:-2], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.rstrip("\n") == report.render([KEPT_RUN])


def test_the_end_to_end_runs_check_their_inputs_before_anything_runs(tmp_path):
    from benchmarks import cli

    assert e2e.TRAIN_SCRIPT.is_file()
    assert e2e.missing_inputs(tmp_path) == [str(tmp_path / f"{n}.gz") for n in e2e.FASHION_MNIST_FILES]
    with pytest.raises(SystemExit):
        cli.parse_args(["--nets", "lenet", "--data-dir", str(tmp_path)])
    assert cli.parse_args(["--nets", "lenet", "--data-dir", str(tmp_path), "--no-e2e"]).e2e is False
    for name in e2e.FASHION_MNIST_FILES:
        (tmp_path / f"{name}.gz").write_bytes(b"")
    assert e2e.missing_inputs(tmp_path) == []


def test_the_tutorial_loop_builds_the_tutorials_lenet():
    import torch

    from benchmarks.tutorial_lenet import LeNet
    from tests.material_code import LeNet as NoteLeNet

    torch.manual_seed(0)
    ours = LeNet().state_dict()
    torch.manual_seed(0)
    note = NoteLeNet().state_dict()
    assert list(ours) == list(note) == [f"{m}.{p}" for m in ("conv.0", "conv.3", "fc.0", "fc.2", "fc.4")
                                        for p in ("weight", "bias")]
    assert all(torch.equal(ours[k], note[k]) for k in ours)


def test_the_tutorial_loop_trains_five_epochs_and_prints_its_accuracy_last(tmp_path):
    from flaxnets.data import write_idx

    src = tmp_path / "debian"
    src.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("t10k", 4)):
        write_idx(src / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        write_idx(src / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    root = e2e.torchvision_fashion_root(src, tmp_path / "root")
    proc = subprocess.run(e2e.tutorial_command(root), cwd=e2e.REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    test_acc = json.loads(lines[-1])["test_acc"]  # as benchmarks.e2e reads it
    assert test_acc in (0.0, 0.25, 0.5, 0.75, 1.0)
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert [e.split(",")[0] for e in epochs] == [f"epoch {k}" for k in range(1, 6)]
    assert epochs[-1].split(", ")[3] == f"test acc {test_acc:.3f}" and "training on  cpu" in lines
