"""The PyTorch engine, twin of ``flaxnets.engine.JaxEngine``: same recipe, data arrays, epoch
loop and metrics. Imports torch and the framework-neutral core, never JAX.

``flaxnets.fit.fit(..., backend="torch")`` drives a ``TorchEngine`` through the same epoch
loop as the JAX one, so the two backends can be compared run for run. The data stays in memory
as one uint8 tensor (no DataLoader of PIL images); each batch is gathered, scaled, augmented and
normalised with tensor ops. Every epoch takes its order from ``flaxnets.fit.epoch_permutation``
(the JAX engine's too: the same batches in both frameworks) and its augmentation and dropout from
generators seeded by (seed, epoch), so an epoch depends only on the state at its start: resuming
from an epoch checkpoint is bit-exact, as in JAX.
"""

from __future__ import annotations

import copy
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import torch_ref
from flaxnets.fit import (NAN_CHECK_EVERY, CheckpointError, NonFiniteLossError, Splits, epoch_batches,
                          epoch_permutation, first_non_finite, lr_schedule)
from flaxnets.recipes import IMAGENET_MEAN, IMAGENET_STD, Recipe
from flaxnets.runs import atomic_write_bytes

FORMAT = "flaxnets-torch-train-state"


def _epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % (2**63)


def random_crop_flip(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Per-image random crop of the zero-padded NCHW batch back to its size, then a random h-flip."""
    b, c, h, w = x.shape
    dev = x.device  # gen draws on x's device
    xp = F.pad(x, (pad, pad, pad, pad))
    off = torch.randint(0, 2 * pad + 1, (b, 2), generator=gen, device=dev)
    rows = (off[:, 0, None] + torch.arange(h, device=dev))[:, None, :, None].expand(b, c, h, w + 2 * pad)
    x = torch.gather(xp, 2, rows)
    cols = (off[:, 1, None] + torch.arange(w, device=dev))[:, None, None, :].expand(b, c, h, w)
    x = torch.gather(x, 3, cols)
    flip = torch.rand(b, generator=gen, device=dev) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def make_optimizer(recipe: Recipe, params: Any) -> torch.optim.Optimizer:
    """The recipe's torch optimiser over ``params`` at the recipe's base learning rate."""
    if recipe.optimizer == "adam":
        return torch.optim.Adam(params, lr=recipe.lr)
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum,
                               weight_decay=recipe.weight_decay)
    raise ValueError(f"unknown optimizer {recipe.optimizer!r}")


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """The mixed-precision context of ``Recipe.precision`` on ``device`` (a no-op for 'fp32')."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def as_loss_dtype(logits: torch.Tensor) -> torch.Tensor:
    """Logits of a bf16 forward in fp32 for the loss; fp32 and fp64 ones as they are."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def default_device() -> torch.device:
    """Where the torch engine trains unless told: the GPU when torch sees one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train_step(model: torch.nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               recipe: Recipe) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step of ``model`` (train mode) on a model-ready batch; (mean CE loss, logits).
    ``recipe.precision`` 'bf16' runs the forward under autocast (fp32 weights, optimiser state and
    BatchNorm statistics; the loss in fp32)."""
    with autocast(x.device, recipe.precision):
        logits = as_loss_dtype(model(x))
    ce = F.cross_entropy(logits, y)
    loss = ce
    if recipe.l2:  # the material's net_batchnorm: loss + l2 * sum of squares of all parameters
        loss = loss + recipe.l2 * sum(p.pow(2.0).sum() for p in model.parameters())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return ce.detach(), logits.detach()


def save_train_state(path: Path, name: str, num_classes: int, snapshot: dict[str, Any],
                     meta: dict[str, Any]) -> Path:
    """Write a training state {'model': state_dict, 'optimizer': optimizer state_dict} of net
    ``name`` and its ``meta`` as one torch file (loadable with weights_only=True), atomically; the
    temporary files of saves killed before their rename are removed."""
    for stale in Path(path).parent.glob(f".{Path(path).name}.*.tmp"):  # atomic_write_bytes' names
        stale.unlink(missing_ok=True)
    buf = io.BytesIO()
    torch.save({"format": FORMAT, "net": name, "num_classes": num_classes,
                "meta": json.dumps(meta, default=str), **snapshot}, buf)
    return atomic_write_bytes(path, buf.getvalue())


def load_train_state(path: Path, name: str, num_classes: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(snapshot, meta) from a file written by ``save_train_state`` for net ``name``."""
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for truncated/corrupt zip files
        raise CheckpointError(f"cannot read {path}: {' '.join(str(e).split())[:300]}") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a flaxnets torch training checkpoint")
    if d["net"] != name or d["num_classes"] != num_classes:
        raise CheckpointError(
            f"{path} is a checkpoint of {d['net']!r} with {d['num_classes']} classes, not "
            f"{name!r} with {num_classes}")
    return {"model": d["model"], "optimizer": d["optimizer"]}, json.loads(d["meta"])


class TorchEngine:
    """Training state of one torch_ref net; implements ``flaxnets.fit.Engine``."""

    backend = "torch"
    devices = 1
    writes_files = True
    compile_seconds = 0.0

    def __init__(self, name: str, splits: Splits, num_classes: int, recipe: Recipe, seed: int,
                 channels_last: bool = False, device: str | torch.device | None = None):
        self.name, self.recipe, self.seed, self.num_classes = name, recipe, seed, num_classes
        self.device = dev = torch.device(device) if device is not None else default_device()
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        # the last step's batch is partial unless the net has BatchNorm (epoch_batches)
        self.steps, self.examples = epoch_batches(name, len(splits.x_train), recipe.batch_size)
        self.lr_at = lr_schedule(recipe, self.steps)
        torch.manual_seed(seed)
        self.model = torch_ref.create(name, num_classes=num_classes).to(dev, memory_format=self.memory_format)
        self.opt = make_optimizer(recipe, self.model.parameters())
        # the data set lives on the device as uint8, as in the JAX engine
        self.x_train = torch.from_numpy(np.array(splits.x_train)).to(dev)
        self.y_train = torch.from_numpy(splits.y_train.astype(np.int64)).to(dev)
        self.evals = {k: (torch.from_numpy(np.array(x)).to(dev), torch.from_numpy(y.astype(np.int64)).to(dev))
                      for k, (x, y) in splits.eval_sets().items()}
        self.mean = torch.tensor(IMAGENET_MEAN, device=dev).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=dev).view(1, 3, 1, 1)

    def _prep(self, x_uint8: torch.Tensor, gen: torch.Generator | None = None) -> torch.Tensor:
        # NHWC uint8 -> NCHW float in the engine's memory format (permute() alone leaves NHWC memory)
        x = x_uint8.permute(0, 3, 1, 2).float().div_(255.0)
        if gen is not None and self.recipe.augment == "crop_flip":
            x = random_crop_flip(x, gen)
        if self.recipe.normalize == "imagenet":
            x = (x - self.mean) / self.std
        return x.contiguous(memory_format=self.memory_format)

    def train_epoch(self, epoch: int, progress: Callable[[int, int, int], None] | None = None
                    ) -> np.ndarray:
        """Run one epoch; returns per-step [summed CE loss, correct count], shape (steps, 2)."""
        bs, r = self.recipe.batch_size, self.recipe
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(epoch * self.steps)
        gen = torch.Generator(self.device).manual_seed(_epoch_seed(self.seed, epoch))
        torch.manual_seed(_epoch_seed(self.seed, epoch))  # dropout draws from the global generator
        perm = torch.from_numpy(epoch_permutation(self.seed, epoch, len(self.x_train))).to(self.device)
        self.model.train()
        # the per-step sums stay on the device (float64: ce * n as exactly as on the host) and
        # are read every NAN_CHECK_EVERY steps, so a GPU is not made to wait for the host per step
        sums, done = [], np.zeros((0, 2))
        for i in range(self.steps):
            idx = perm[i * bs:(i + 1) * bs]
            x, y = self._prep(self.x_train[idx], gen), self.y_train[idx]
            ce, logits = train_step(self.model, self.opt, x, y, r)
            sums.append(torch.stack([ce.double() * len(y), (logits.argmax(1) == y).sum().double()]))
            if progress:
                progress(epoch, i + 1, self.steps)
            if (i + 1) % NAN_CHECK_EVERY == 0 or i + 1 == self.steps:
                start = len(done)
                done = np.concatenate([done, torch.stack(sums[start:]).cpu().numpy()])
                bad = first_non_finite(done[start:, 0])
                if bad is not None:
                    raise NonFiniteLossError(epoch, start + bad, epoch * self.steps + start + bad,
                                             float(done[start + bad, 0]))
        return done

    @torch.inference_mode()
    def evaluate(self, split: str) -> tuple[float, float, np.ndarray]:
        """(mean loss, accuracy, predictions) on 'val' or 'test' with the current weights."""
        x_all, y_all = self.evals[split]
        self.model.eval()
        loss, preds = 0.0, []
        bs = self.recipe.batch_size
        for i in range(0, len(x_all), bs):
            with autocast(self.device, self.recipe.precision):
                logits = as_loss_dtype(self.model(self._prep(x_all[i:i + bs])))
            y = y_all[i:i + bs]
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            preds.append(logits.argmax(1))
        self.model.train()
        p = torch.cat(preds)
        return loss / len(y_all), float((p == y_all).double().mean()), p.cpu().numpy()

    def get_state(self) -> dict[str, Any]:
        """A copy of the full training state (weights, buffers, optimiser)."""
        return {"model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                "optimizer": copy.deepcopy(self.opt.state_dict())}

    def set_state(self, snapshot: dict[str, Any]) -> None:
        """Continue from ``snapshot`` (from ``get_state`` or ``load_state``)."""
        self.model.load_state_dict(snapshot["model"], strict=True)
        self.opt.load_state_dict(copy.deepcopy(snapshot["optimizer"]))

    def save_state(self, snapshot: dict[str, Any], path: Path, meta: dict[str, Any]) -> Path:
        """Write ``snapshot`` and ``meta`` as one torch file (``save_train_state``)."""
        return save_train_state(path, self.name, self.num_classes, snapshot, meta)

    @staticmethod
    def has_state(path: Path) -> bool:
        """Whether ``path`` holds a checkpoint to resume from."""
        return Path(path).is_file()

    def load_state(self, path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        """(snapshot, meta) from a file written by ``save_state`` for this net."""
        return load_train_state(path, self.name, self.num_classes)

    def final_model(self) -> torch.nn.Module:
        """The torch model holding the current weights."""
        return self.model

    def torch_state_dict(self) -> dict[str, np.ndarray]:
        """The current weights as a state_dict of numpy arrays."""
        return {k: v.detach().cpu().numpy().copy() for k, v in self.model.state_dict().items()}
