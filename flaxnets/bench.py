"""Side-by-side training benchmark (issue 6): JAX and PyTorch train-step throughput measured in
one process, interleaved; the machine's FP32 matmul peak; FLOPs per step; end-to-end LeNet.

Throughput is what training really runs: the engines of ``fit`` (``JaxEngine``, ``TorchEngine``)
built on synthetic uint8 data of the net's input shape, timed over ``engine.train_epoch`` with a
train set of exactly ``steps`` batches, so per-step overheads count. ``scripts/bench.py`` is the
command line.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from flaxnets.xla_cpu.switch import SPEEDUPS
from flaxnets.registry import get_spec, list_nets

if TYPE_CHECKING:
    from flaxnets.fit import Splits

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("jax", "torch", "torch_cl", "torch_compile")
ABLATED = "jax_without"  # the JAX engine traced without the speed-ups named by --without
LABELS = {"jax": "JAX", "torch": "torch", "torch_cl": "torch-CL", "torch_compile": "torch.compile",
          ABLATED: "JAX without"}
EAGER = ("torch", "torch_cl")  # the PyTorch variants the issue's goal compares JAX with
TRAIN_OVER_FORWARD = 3  # backward ~ 2x forward (gradients of inputs and of weights)

# Sized for a 10-minute default run on the idle 2-core CPU (estimated from CPU times): the
# recipe's batch for the small nets, smaller ones for the deep ResNets, DenseNets at 32x32.
DEFAULT_BATCH = {"resnet56": 64, "resnet110": 32, "resnet1202": 8, "densenet121": 16,
                 "densenet169": 16, "densenet201": 16, "densenet121_se": 16}
DEFAULT_IMAGE = 32  # side of the square input of the any-size nets (the DenseNets)
# A timed round trains a variant this long, back to back, after one untimed epoch (--settle).
# With one 3-step epoch per round (the earlier rounds) JAX's first steps after torch's ran slower,
# and short epochs were mostly those. JAX / torch-CL (2026-12-02): the default run with one 3-step
# epoch per round said lenet 0.94x, dilated 0.83x, net_batchnorm 0.67x, densenet121 0.88x;
# engines built as here, in rounds of one 30-step epoch, lenet 1.07x, dilated 1.05x,
# net_batchnorm 0.90x. The default run with 0.5 s rounds: 1.01x, 1.09x, 0.71x, 0.97x; with a
# settling epoch too, two runs: 1.02-1.05x, 1.02-1.08x, 1.00-1.07x, 1.15-1.28x. Training runs its
# steps back to back for seconds to minutes per epoch. The default run took 227 s with single
# epochs, 222 s with 0.5 s rounds, 272 s with the settling epochs as well.
ROUND_SECONDS = 0.5
DEFAULT_COMPILE = ("lenet",)  # a cold torch.compile took 1-2 minutes per net here, under load
# The default run keeps one net per kernel mix for the same budget, JAX compilation being most of
# it (wall time of a JaxEngine build, measured: densenet121 68-120 s, densenet169 143 s,
# densenet201 213 s, resnet1202 108 s now that its stages are scanned; resnet110 16 s).
# The deeper ResNets and the other DenseNets repeat the blocks of resnet20 and densenet121.
DEFAULT_NETS = ("lenet", "dilated", "net", "net_width", "net_dropout", "net_batchnorm", "resnet20",
                "densenet121")


@dataclass(frozen=True)
class Case:
    """One net as benchmarked: batch size, input shape (H, W, C) and steps per timed epoch."""

    net: str
    batch: int
    input_shape: tuple[int, int, int]
    steps: int


def make_case(net: str, steps: int, batch: int | None = None, image: int | None = None) -> Case:
    """The benchmark case of ``net``: its default batch and input unless overridden."""
    from flaxnets.recipes import recipe_for

    spec = get_spec(net)
    h, w, c = spec.input_shape
    if spec.any_size:
        h = w = image or DEFAULT_IMAGE
    return Case(net, batch or DEFAULT_BATCH.get(net, recipe_for(net).batch_size), (h, w, c), steps)


def synthetic_splits(case: Case, num_classes: int, seed: int = 0) -> Splits:
    """Random uint8 images and labels: ``steps`` full batches to train on, one image to test on."""
    from flaxnets.fit import Splits

    rng = np.random.default_rng(seed)
    n = case.batch * case.steps
    x = rng.integers(0, 256, (n, *case.input_shape), dtype=np.uint8)
    y = rng.integers(0, num_classes, n).astype(np.int32)
    return Splits(x, y, x[:1], y[:1])


# --------------------------------------------------------------------------- FLOPs and peak
def forward_flops(net: str, input_shape: tuple[int, int, int]) -> int:
    """FLOPs (2 per multiply-add) of one image's forward pass through the conv and linear layers.

    Counted from the layer shapes seen by forward hooks on the torch twin; normalisation,
    activations, pooling and bias additions are left out (a few percent at most).
    """
    import torch

    import torch_ref

    model = torch_ref.create(net).eval()
    macs = [0]

    def hook(mod: torch.nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        if isinstance(mod, torch.nn.Conv2d):  # per output element: (C_in / groups) * kh * kw
            k = mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
        else:
            k = mod.in_features
        macs[0] += out[0].numel() * k

    hooks = [m.register_forward_hook(hook) for m in model.modules()
             if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    h, w, c = input_shape
    try:
        with torch.inference_mode():
            model(torch.zeros(1, c, h, w))
    finally:
        for hk in hooks:
            hk.remove()
    return 2 * macs[0]


def matmul_peak(n: int = 2048, repeats: int = 5) -> dict[str, Any]:
    """Measured FP32 (n x n) @ (n x n) FLOP/s of JAX and torch, interleaved; the larger is the peak."""
    import jax
    import jax.numpy as jnp
    import torch

    a = np.random.default_rng(0).standard_normal((2, n, n), dtype=np.float32)
    ja, jb = jnp.asarray(a[0]), jnp.asarray(a[1])
    ta, tb = torch.from_numpy(a[0]), torch.from_numpy(a[1])
    jmm = jax.jit(jnp.matmul)
    runs = {"jax": lambda: jmm(ja, jb).block_until_ready(), "torch": lambda: torch.mm(ta, tb)}
    seconds: dict[str, list[float]] = {k: [] for k in runs}
    for i in range(repeats + 1):  # the first round warms up (compilation, thread pools)
        for k, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            if i:
                seconds[k].append(time.perf_counter() - t0)
    flop = 2 * n**3
    out: dict[str, Any] = {"n": n, "flop_per_matmul": flop}
    for k, s in seconds.items():
        out[k] = {"seconds": s, "flops": flop / statistics.median(s)}
    out["peak_flops"] = max(out[k]["flops"] for k in runs)
    out["peak_from"] = max(runs, key=lambda k: out[k]["flops"])
    return out


# --------------------------------------------------------------------------- throughput
class CompileTimeout(Exception):
    """torch.compile's first epoch ran past the time limit."""


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise CompileTimeout in the main thread after ``seconds`` (no limit if None)."""
    if not seconds:
        yield
        return

    def on_alarm(signum: int, frame: Any) -> None:
        raise CompileTimeout(f"not compiled within {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def build_engine(variant: str, case: Case, splits: Splits, num_classes: int, seed: int,
                 without: tuple[str, ...] = ()) -> Any:
    """The training engine of ``variant`` for ``case``, exactly as ``fit`` would build it
    (``ABLATED``: the JAX engine traced without the speed-ups ``without``)."""
    from flaxnets import xla_cpu
    from flaxnets.engine import JaxEngine
    from flaxnets.recipes import recipe_for

    recipe = recipe_for(case.net, batch_size=case.batch)
    if variant in ("jax", ABLATED):
        with xla_cpu.without(*(without if variant == ABLATED else ())):  # its steps compile here
            return JaxEngine(case.net, splits, num_classes, recipe, seed)
    from torch_ref.engine import TorchEngine

    engine = TorchEngine(case.net, splits, num_classes, recipe, seed, channels_last=variant == "torch_cl")
    if variant == "torch_compile":
        import torch

        # Wraps the engine's own model (the optimiser keeps the same parameters); compiled
        # lazily, so the first epoch pays for it.
        engine.model = torch.compile(engine.model)
    return engine


def _cause(e: BaseException | None, kind: type[BaseException]) -> BaseException | None:
    """``e`` or the first exception of type ``kind`` in its chain of causes, else None."""
    while e is not None and not isinstance(e, kind):
        e = e.__cause__ or e.__context__
    return e


def _error(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first[:200]}"


def epochs_per_round(warmup_seconds: list[float], round_seconds: float) -> int:
    """Epochs each variant trains back to back in a timed round: enough that the fastest
    variant's round lasts ``round_seconds`` (from its last warm-up epoch), at least one."""
    fastest = min(warmup_seconds, default=0.0)
    return max(1, math.ceil(round_seconds / fastest)) if fastest > 0 else 1


def measure_case(case: Case, variants: tuple[str, ...] = VARIANTS, repeats: int = 3, warmup: int = 1,
                 compile_timeout: float | None = 120.0, seed: int = 0, without: tuple[str, ...] = (),
                 round_seconds: float = 0.0, settle: int = 0,
                 log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Time ``train_epoch`` of each variant's engine, interleaved (J, T, T-CL, TC, J, ...).

    The first ``warmup`` rounds are not counted; a variant that fails (or whose torch.compile
    epoch exceeds ``compile_timeout`` s) is reported with its status and dropped from the rounds.
    A timed round trains ``epochs_per_round`` epochs of a variant back to back (``seconds`` holds
    its time per epoch), after ``settle`` untimed ones: the first steps after another variant ran
    are slow (its threads still spin, the caches hold its data), which training, running one
    engine, never sees; a round of a few short epochs measured mostly that.
    """
    if warmup < 1:
        raise ValueError("at least one warm-up round: it is where torch.compile compiles")
    num_classes = get_spec(case.net).num_classes
    splits = synthetic_splits(case, num_classes, seed)
    res: dict[str, dict[str, Any]] = {v: {"status": "ok", "warmup_seconds": [], "seconds": []}
                                      for v in variants}
    engines: dict[str, Any] = {}

    def drop(v: str, status: str) -> None:
        res[v]["status"] = status
        engines.pop(v, None)
        log(f"  {case.net} {LABELS[v]}: {status}")
        if v == "torch_compile" and "torch._dynamo" in sys.modules:
            sys.modules["torch._dynamo"].reset()  # forget the half-built graphs

    for v in variants:
        t0 = time.perf_counter()
        try:
            engines[v] = build_engine(v, case, splits, num_classes, seed, without)
        except Exception as e:  # reported per variant; the other variants still run
            drop(v, f"failed: {_error(e)}")
            continue
        res[v]["build_seconds"] = time.perf_counter() - t0
        if v in ("jax", ABLATED):
            res[v]["compile_seconds"] = engines[v].compile_seconds  # train, eval, permutation
    per_round, epoch = 1, 0
    for rnd in range(warmup + repeats):
        if rnd == warmup:
            per_round = epochs_per_round([res[v]["warmup_seconds"][-1] for v in engines], round_seconds)
        epochs, warm = (1, 0) if rnd < warmup else (per_round, settle)
        timed = epoch + warm  # every variant trains the same epoch numbers in a round
        for v in list(engines):
            limit = compile_timeout if v == "torch_compile" and rnd == 0 else None
            try:
                with time_limit(limit):
                    for ep in range(epoch, timed):
                        engines[v].train_epoch(ep)
                    t0 = time.perf_counter()
                    for ep in range(timed, timed + epochs):
                        engines[v].train_epoch(ep)
                    dt = (time.perf_counter() - t0) / epochs
            except Exception as e:
                timeout = _cause(e, CompileTimeout)  # inductor re-raises it wrapped
                drop(v, f"timeout: {timeout}" if timeout else f"failed: {_error(e)}")
                continue
            res[v]["warmup_seconds" if rnd < warmup else "seconds"].append(dt)
        epoch = timed + epochs
    images = case.batch * case.steps
    for v, r in res.items():
        if r["status"] == "ok":
            r["images_per_s"] = [images / s for s in r["seconds"]]
            r["median_images_per_s"] = images / statistics.median(r["seconds"])
    tc = res.get("torch_compile")
    if tc and tc["status"] == "ok":  # the first epoch minus a steady one
        tc["compile_seconds"] = max(0.0, tc["warmup_seconds"][0] - statistics.median(tc["seconds"]))
    return {"net": case.net, "batch": case.batch, "input": list(case.input_shape),
            "steps": case.steps, "epochs_per_round": per_round, "variants": res}


def summarise(row: dict[str, Any], peak_flops: float) -> dict[str, Any]:
    """Add FLOPs per image and step, JAX / best eager PyTorch and each variant's % of the peak."""
    fwd = forward_flops(row["net"], tuple(row["input"]))
    row["forward_flops_per_image"] = fwd
    row["train_flops_per_image"] = TRAIN_OVER_FORWARD * fwd
    row["train_flops_per_step"] = TRAIN_OVER_FORWARD * fwd * row["batch"]
    ips = {v: r["median_images_per_s"] for v, r in row["variants"].items() if r["status"] == "ok"}
    row["percent_of_peak"] = {v: 100 * x * TRAIN_OVER_FORWARD * fwd / peak_flops for v, x in ips.items()}
    best = max((v for v in EAGER if v in ips), key=ips.get, default=None)
    row["jax_over_best_eager"] = _paired_ratio(row, best)
    row["jax_over_ablated"] = _paired_ratio(row, ABLATED if ABLATED in ips else None)
    return row


def _paired_ratio(row: dict[str, Any], other: str | None) -> float | None:
    """JAX's speed over variant ``other``: the median over rounds of other's epoch time / JAX's
    in the same round. Paired, because this machine's speed drifts by 20-30 % between rounds
    a minute apart and both variants of a round see the same drift (with one round it is the
    ratio of the medians)."""
    vs = row["variants"]
    if other is None or vs.get("jax", {}).get("status") != "ok":
        return None
    return statistics.median(o / j for o, j in zip(vs[other]["seconds"], vs["jax"]["seconds"]))


# --------------------------------------------------------------------------- end to end
MATERIAL_LENET = r'''
# The material's own LeNet training (corr2d_and_lenet.txt, 5.5, and d2lzh_pytorch's
# load_data_fashion_mnist: ToTensor, DataLoader batch 256, 4 workers), copied as written.
# Changes, each marked "bench:": the data root is argv[1] with download=False (the files are
# in place, nothing is fetched), and the last test accuracy is printed as JSON at the end.
import json  # bench
import sys
import time
import torch
from torch import nn, optim
import torchvision

device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')

class LeNet(nn.Module):
    def __init__(self):
        super(LeNet, self).__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 6, 5), # in_channels, out_channels, kernel_size
            nn.Sigmoid(),
            nn.MaxPool2d(2, 2), # kernel_size, stride
            nn.Conv2d(6, 16, 5),
            nn.Sigmoid(),
            nn.MaxPool2d(2, 2)
        )
        self.fc = nn.Sequential(
            nn.Linear(16*4*4, 120),
            nn.Sigmoid(),
            nn.Linear(120, 84),
            nn.Sigmoid(),
            nn.Linear(84, 10)
        )

    def forward(self, img):
        feature = self.conv(img)
        output = self.fc(feature.view(img.shape[0], -1))
        return output

net = LeNet()
print(net)

def load_data_fashion_mnist(batch_size, resize=None, root='~/Datasets/FashionMNIST'):
    """Download the fashion mnist dataset and then load into memory."""
    trans = []
    if resize:
        trans.append(torchvision.transforms.Resize(size=resize))
    trans.append(torchvision.transforms.ToTensor())

    transform = torchvision.transforms.Compose(trans)
    # bench: download=False
    mnist_train = torchvision.datasets.FashionMNIST(root=root, train=True, download=False, transform=transform)
    mnist_test = torchvision.datasets.FashionMNIST(root=root, train=False, download=False, transform=transform)
    if sys.platform.startswith('win'):
        num_workers = 0  # 0表示不用额外的进程来加速读取数据
    else:
        num_workers = 4
    train_iter = torch.utils.data.DataLoader(mnist_train, batch_size=batch_size, shuffle=True, num_workers=num_workers)
    test_iter = torch.utils.data.DataLoader(mnist_test, batch_size=batch_size, shuffle=False, num_workers=num_workers)

    return train_iter, test_iter

batch_size = 256
train_iter, test_iter = load_data_fashion_mnist(batch_size=batch_size, root=sys.argv[1])  # bench: root

def evaluate_accuracy(data_iter, net, device=None):
    if device is None and isinstance(net, torch.nn.Module):
        # 如果没指定device就使用net的device
        device = list(net.parameters())[0].device
    acc_sum, n = 0.0, 0
    with torch.no_grad():
        for X, y in data_iter:
            if isinstance(net, torch.nn.Module):
                net.eval() # 评估模式, 这会关闭dropout
                acc_sum += (net(X.to(device)).argmax(dim=1) == y.to(device)).float().sum().cpu().item()
                net.train() # 改回训练模式
            else: # 自定义的模型, 3.13节之后不会用到, 不考虑GPU
                if('is_training' in net.__code__.co_varnames): # 如果有is_training这个参数
                    # 将is_training设置成False
                    acc_sum += (net(X, is_training=False).argmax(dim=1) == y).float().sum().item()
                else:
                    acc_sum += (net(X).argmax(dim=1) == y).float().sum().item()
            n += y.shape[0]
    return acc_sum / n

def train_ch5(net, train_iter, test_iter, batch_size, optimizer, device, num_epochs):
    net = net.to(device)
    print("training on ", device)
    loss = torch.nn.CrossEntropyLoss()
    for epoch in range(num_epochs):
        train_l_sum, train_acc_sum, n, batch_count, start = 0.0, 0.0, 0, 0, time.time()
        for X, y in train_iter:
            X = X.to(device)
            y = y.to(device)
            y_hat = net(X)
            l = loss(y_hat, y)
            optimizer.zero_grad()
            l.backward()
            optimizer.step()
            train_l_sum += l.cpu().item()
            train_acc_sum += (y_hat.argmax(dim=1) == y).sum().cpu().item()
            n += y.shape[0]
            batch_count += 1
        test_acc = evaluate_accuracy(test_iter, net)
        print('epoch %d, loss %.4f, train acc %.3f, test acc %.3f, time %.1f sec'
              % (epoch + 1, train_l_sum / batch_count, train_acc_sum / n, test_acc, time.time() - start))

# bench: keep the accuracies train_ch5 computes (it looks evaluate_accuracy up at each call)
_accuracies, _evaluate = [], evaluate_accuracy
def evaluate_accuracy(data_iter, net, device=None):
    _accuracies.append(_evaluate(data_iter, net, device))
    return _accuracies[-1]

lr, num_epochs = 0.001, 5
optimizer = torch.optim.Adam(net.parameters(), lr=lr)
train_ch5(net, train_iter, test_iter, batch_size, optimizer, device, num_epochs)
print(json.dumps({"test_acc": _accuracies[-1]}))  # bench
'''

FASHION_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                       "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def torchvision_fashion_root(src: Path, root: Path) -> Path:
    """``root`` laid out as torchvision's FashionMNIST expects after its download.

    torchvision reads the raw IDX files uncompressed from ``root/FashionMNIST/raw`` (its download
    step unpacks them there), so Debian's .gz files are unpacked, not linked.
    """
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name in FASHION_MNIST_FILES:
        with gzip.open(src / f"{name}.gz", "rb") as f:
            (raw / name).write_bytes(f.read())
    return root


def _timed_run(cmd: list[str], timeout: float, env: dict[str, str] | None = None
               ) -> tuple[float, subprocess.CompletedProcess | None, str]:
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                              env=None if env is None else dict(os.environ, **env))
    except subprocess.TimeoutExpired:
        return time.perf_counter() - t0, None, f"timeout after {timeout:.0f} s"
    status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode}): {proc.stderr[-300:]}"
    return time.perf_counter() - t0, proc, status


def end_to_end(workdir: Path, data_src: Path, timeout: float = 900.0,
               log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Wall time and test accuracy of LeNet's 5-epoch recipe: scripts/train.py with each backend
    (start-up, data, compilation, run files included), and the material's own PyTorch loop.

    JAX runs twice on a compilation cache of its own: first empty (a machine's first run), then
    filled by that first run (every later run).
    """
    runs: dict[str, dict[str, Any]] = {}
    cache = {"FLAXNETS_COMPILE_CACHE": str(workdir / "xla-cache")}
    for key, backend, label in (("jax", "jax", "scripts/train.py --backend jax, first run"),
                                ("jax_warm", "jax", "scripts/train.py --backend jax, compilation cached"),
                                ("torch", "torch", "scripts/train.py --backend torch")):
        out = workdir / f"lenet-{key}"
        cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "--net", "lenet",
               "--backend", backend, "--out", str(out)]
        wall, _, status = _timed_run(cmd, timeout, cache)
        run = {"label": label, "command": cmd[1:], "status": status, "wall_seconds": wall}
        if status == "ok":
            cfg = json.loads((out / "config.json").read_text())
            run.update(test_acc=cfg["test_acc"], compile_seconds=cfg["compile_seconds"],
                       own_wall_seconds=cfg["wall_seconds"])  # train.py's clock: after the imports
        runs[key] = run
        log(f"  e2e {key}: {status}, {wall:.1f} s, acc {run.get('test_acc')}")
    root = torchvision_fashion_root(data_src, workdir / "torchvision-data")  # outside the timing
    script = workdir / "material_lenet.py"
    script.write_text(MATERIAL_LENET)
    wall, proc, status = _timed_run([sys.executable, str(script), str(root)], timeout)
    run = {"label": "the material's loop (train_ch5, DataLoader + ToTensor, batch 256)",
           "command": [script.name, "ROOT"], "status": status, "wall_seconds": wall}
    if proc is not None and status == "ok":
        run["test_acc"] = json.loads(proc.stdout.strip().splitlines()[-1])["test_acc"]
        run["log"] = proc.stdout.strip().splitlines()[:-1]
    runs["material"] = run
    log(f"  e2e material: {status}, {wall:.1f} s, acc {run.get('test_acc')}")
    return runs


# --------------------------------------------------------------------------- machine and report
def machine_info() -> dict[str, Any]:
    """CPU model, cores, load, thread settings and library versions of this run."""
    import importlib.metadata as md

    import jax
    import torch

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    versions = {"python": platform.python_version()}
    for pkg in ("jax", "jaxlib", "flax", "optax", "torch", "torchvision", "numpy"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = "not installed"
    return {"cpu": model, "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "platform": platform.platform(), "loadavg_start": os.getloadavg(),
            "jax_backend": jax.default_backend(), "jax_devices": len(jax.devices()),
            "torch_threads": torch.get_num_threads(),
            "torch_inductor_cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR", "default (on disk)"),
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
            "versions": versions}


def _num(x: float | None, fmt: str = ",.0f") -> str:
    return "—" if x is None else format(x, fmt)


def _cell(r: dict[str, Any]) -> str:
    if r["status"] == "ok":
        return _num(r["median_images_per_s"])
    return r["status"].split(":")[0]  # 'failed' or 'timeout'


def _round_text(report: dict[str, Any]) -> str:
    """How long a timed round was: its epochs per net (reports before rounds had one)."""
    per = {row["net"]: row.get("epochs_per_round", 1) for row in report["nets"]}
    seconds = report["settings"].get("round_seconds", 0.0)
    if set(per.values()) == {1}:
        return "one epoch per variant"
    return (f"≥ {seconds:g} s of back-to-back epochs per variant ("
            + ", ".join(f"{net} {k}" for net, k in per.items()) + ")")


def format_table(report: dict[str, Any]) -> str:
    """The markdown tables of a report: throughput per net, then the end-to-end runs."""
    heads = ["net", "batch", "input", *(f"{LABELS[v]} img/s" for v in VARIANTS),
             "JAX ÷ best PyTorch eager", "% of peak J / best T", "compile s J / TC"]
    lines = ["| " + " | ".join(heads) + " |", "|---|---:|---|" + "---:|" * (len(heads) - 3)]
    for row in report["nets"]:
        vs = row["variants"]
        pct = row["percent_of_peak"]
        best_t = max((pct[v] for v in pct if v not in ("jax", ABLATED)), default=None)
        comp = [vs[v].get("compile_seconds") if v in vs else None for v in ("jax", "torch_compile")]
        cells = [row["net"], str(row["batch"]), "×".join(map(str, row["input"])),
                 *(_cell(vs[v]) if v in vs else "not run" for v in VARIANTS),
                 _num(row["jax_over_best_eager"], ".2f") + ("×" if row["jax_over_best_eager"] else ""),
                 f"{_num(pct.get('jax'), '.1f')} / {_num(best_t, '.1f')}",
                 f"{_num(comp[0], '.1f')} / {_num(comp[1], '.1f')}"]
        lines.append("| " + " | ".join(cells) + " |")
    peak = report["peak"]
    m = report["machine"]
    lines += ["", f"Peak FP32 matmul ({peak['n']}×{peak['n']}): JAX {peak['jax']['flops'] / 1e9:.1f}, "
              f"torch {peak['torch']['flops'] / 1e9:.1f} GFLOP/s; % of peak = img/s × training FLOPs "
              f"per image / {peak['peak_flops'] / 1e9:.1f} GFLOP/s, training FLOPs ≈ "
              f"{TRAIN_OVER_FORWARD}× the forward pass's conv/linear multiply-adds × 2.",
              f"Medians of {report['settings']['repeats']} interleaved rounds of "
              f"{report['settings']['steps']}-step epochs after {report['settings']['warmup']} "
              f"warm-up, each round {_round_text(report)} after {report['settings'].get('settle', 0)} "
              f"untimed; JAX ÷ PyTorch pairs the rounds: the median of the best-median eager "
              f"variant's time / JAX's in the same round; compile s: JAX engine build (train+eval "
              f"step, cold), torch.compile first epoch minus a steady one (torch's on-disk caches: warm after a first run). "
              f"{m['cpu']}, {m['cores']} cores, torch threads {m['torch_threads']}, load average "
              f"{m['loadavg_start'][0]:.1f} → {report['loadavg_end'][0]:.1f}."]
    left_out = [n for n in list_nets() if n not in report["settings"]["nets"]]
    if left_out:
        lines.append(f"Not in this run: {', '.join(left_out)} (`--nets all` runs every net).")
    if report["settings"].get("without"):
        lines += ["", format_ablation(report)]
    if report.get("e2e"):
        lines += ["", format_e2e(report["e2e"])]
    return "\n".join(lines)


def format_ablation(report: dict[str, Any]) -> str:
    """What the speed-ups named by --without bring: the JAX engine with and without them."""
    names = ", ".join(report["settings"]["without"])
    lines = [f"| net | JAX img/s | JAX without {names} img/s | speed-up | compile s with / without |",
             "|---|---:|---:|---:|---:|"]
    for row in report["nets"]:
        vs, ratio = row["variants"], row.get("jax_over_ablated")
        comp = [_num(vs[v].get("compile_seconds"), ".1f") for v in ("jax", ABLATED)]
        lines.append(f"| {row['net']} | {_cell(vs['jax'])} | {_cell(vs[ABLATED])} | "
                     f"{_num(ratio, '.2f') + ('×' if ratio else '')} | {comp[0]} / {comp[1]} |")
    return "\n".join(lines + ["", "Same engine, traced with and without them, timed interleaved "
                                   "with the variants above (same function, same data)."])


def format_e2e(e2e: dict[str, dict[str, Any]]) -> str:
    """The end-to-end LeNet table and whether JAX meets the issue's goal against the material."""
    mat = e2e["material"]
    base = mat["wall_seconds"] if mat["status"] == "ok" else None
    lines = ["| LeNet, 5 epochs, end to end | wall s | test acc | speed-up vs material |",
             "|---|---:|---:|---:|"]
    for run in e2e.values():
        ok = run["status"] == "ok"
        speed = _num(base / run["wall_seconds"], ".2f") + "×" if ok and base else "—"
        acc = _num(run.get("test_acc"), ".4f") if ok else run["status"][:60]
        lines.append(f"| {run['label']} | {run['wall_seconds']:.1f} | {acc} | {speed} |")
    for key, when in (("jax", "first run"), ("jax_warm", "compilation cached")):
        jax_run = e2e.get(key)
        if base and jax_run and jax_run["status"] == "ok":
            speed, acc_ok = base / jax_run["wall_seconds"], jax_run["test_acc"] >= mat["test_acc"]
            met = "met" if speed >= 2 and acc_ok else "not met"
            lines += ["", f"Goal (≥ 2× faster than the material at equal or better accuracy), "
                      f"{when}: {met} — {speed:.2f}×, accuracy {jax_run['test_acc']:.4f} vs "
                      f"{mat['test_acc']:.4f}."]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line of scripts/bench.py."""
    p = argparse.ArgumentParser(prog="scripts/bench.py", description=__doc__.splitlines()[0])
    p.add_argument("--nets", nargs="+", default=list(DEFAULT_NETS),
                   help=f"'all' or some of: {', '.join(list_nets())} (default {' '.join(DEFAULT_NETS)})")
    p.add_argument("--batch", type=int, help="batch size for every net (default: per net, in the table)")
    p.add_argument("--steps", type=int, default=3, help="steps per timed epoch (default 3)")
    p.add_argument("--repeats", type=int, default=3, help="timed epochs per variant (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed epochs first (default 1, at least 1)")
    p.add_argument("--round-seconds", type=float, default=ROUND_SECONDS,
                   help="a timed round trains each variant for as many epochs back to back as make "
                        f"the fastest one's last this long (default {ROUND_SECONDS}; 0: one epoch)")
    p.add_argument("--settle", type=int, default=1,
                   help="untimed epochs of a variant before each of its timed rounds, so that the "
                        "round starts as training does, not just after another variant (default 1)")
    p.add_argument("--image", type=int, help=f"side of the DenseNets' input (default {DEFAULT_IMAGE})")
    p.add_argument("--compile-nets", nargs="+", default=list(DEFAULT_COMPILE),
                   help="nets also timed with torch.compile: names, 'all' or 'none' "
                        f"(default {' '.join(DEFAULT_COMPILE)}; each compile takes minutes here)")
    p.add_argument("--compile-timeout", type=float, default=120.0,
                   help="seconds torch.compile's first epoch may take before it is reported as a timeout")
    p.add_argument("--without", nargs="+", default=[], choices=sorted(SPEEDUPS), metavar="SPEEDUP",
                   help="also time the JAX engine without these speed-ups, interleaved (what each "
                        f"brings): {', '.join(sorted(SPEEDUPS))}")
    p.add_argument("--e2e", action=argparse.BooleanOptionalAction, default=True,
                   help="end-to-end LeNet runs: train.py jax and torch, the material's loop (minutes)")
    p.add_argument("--peak-size", type=int, default=2048,
                   help="matrix side of the matmul peak (default 2048)")
    p.add_argument("--torch-threads", type=int,
                   help="torch.set_num_threads for the throughput part (default: torch's own); on a "
                        "busy machine 1 avoids waits for descheduled OpenMP threads")
    p.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist",
                   help="FashionMNIST .gz IDX files for the material's loop")
    p.add_argument("--out", default="bench.json", help="JSON report path (default bench.json)")
    args = p.parse_args(argv)
    args.nets = list_nets() if args.nets == ["all"] else args.nets
    args.compile_nets = {"all": list_nets(), "none": []}.get(" ".join(args.compile_nets), args.compile_nets)
    for n in args.nets + args.compile_nets:
        if n not in list_nets():
            p.error(f"unknown net {n!r}; valid: {', '.join(list_nets())}")
    for flag in ("steps", "repeats", "warmup", "torch_threads"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    if not args.round_seconds >= 0:  # also NaN
        p.error("--round-seconds must be 0 or more")
    if args.settle < 0:
        p.error("--settle must be 0 or more")
    return args


def run(args: argparse.Namespace, log: Callable[[str], None] = lambda s: None) -> dict[str, Any]:
    """Measure everything ``args`` asks for and return the report (what bench.json holds)."""
    t0 = time.perf_counter()
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    settings = {k: v for k, v in vars(args).items() if k not in ("out", "data_dir")}
    report: dict[str, Any] = {"machine": machine_info(), "settings": settings}
    report["peak"] = peak = matmul_peak(args.peak_size)
    log(f"peak FP32 matmul {peak['peak_flops'] / 1e9:.1f} GFLOP/s ({peak['peak_from']})")
    report["nets"] = []
    for net in args.nets:
        case = make_case(net, args.steps, args.batch, args.image)
        log(f"{net}: batch {case.batch}, input {case.input_shape}, {case.steps} steps")
        variants = (VARIANTS if net in args.compile_nets else VARIANTS[:-1]) + ((ABLATED,) * bool(args.without))
        w0, c0 = time.perf_counter(), time.process_time()
        row = measure_case(case, variants, args.repeats, args.warmup, args.compile_timeout,
                           without=tuple(args.without), round_seconds=args.round_seconds,
                           settle=args.settle, log=log)
        row.update(wall_seconds=time.perf_counter() - w0, cpu_seconds=time.process_time() - c0)
        report["nets"].append(summarise(row, peak["peak_flops"]))
        log(f"  {net}: " + ", ".join(f"{LABELS[v]} {_cell(r)}" for v, r in row["variants"].items())
            + f" ({row['wall_seconds']:.0f} s, {row['cpu_seconds']:.0f} s CPU)")
    report["e2e"] = None
    if args.e2e:
        with tempfile.TemporaryDirectory(prefix="flaxnets-bench-") as tmp:
            report["e2e"] = end_to_end(Path(tmp), Path(args.data_dir), log=log)
    report["loadavg_end"] = os.getloadavg()
    report["wall_seconds"] = time.perf_counter() - t0
    return report


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, write the JSON report and print the markdown table."""
    args = parse_args(argv)
    report = run(args, log=lambda s: print(s, file=sys.stderr, flush=True))
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(report))
    print(f"\nwrote {args.out} in {report['wall_seconds']:.0f} s")
    return 0
