#!/usr/bin/env bash
# Set up flaxnets on a fresh machine of this kind (2-core CPU, package registries only):
# real FashionMNIST from Debian, the pinned torch/torchvision builds that lie on this disk,
# CPU JAX/Flax/Optax from PyPI, and this package in editable mode with its test extras.
set -euo pipefail
cd "$(dirname "$0")"

FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "setup: installing FashionMNIST (Debian package dataset-fashion-mnist)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
fi

echo "setup: installing Python packages (torch==2.14.1 and torchvision==0.29.1 are pinned)"
python -m pip install -q --disable-pip-version-check -e '.[dev]'
# the CPU convolutions through oneDNN (flaxnets/xla_cpu/onednn.py); without it XLA's own run
echo "setup: building the oneDNN convolution extension"
python -m flaxnets.xla_cpu.onednn_build || echo "setup: continuing without it"
echo "setup: done"
