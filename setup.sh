#!/usr/bin/env bash
# Set up flaxnets on a fresh machine of this kind (2-core CPU, package registries only):
# real FashionMNIST from Debian, the pinned torch/torchvision builds that lie on this disk,
# CPU JAX/Flax/Optax from PyPI, and this package in editable mode with its test extras.
set -euo pipefail
cd "$(dirname "$0")"

# Debian packages: FashionMNIST, and tcmalloc, which the training and benchmark scripts run
# under (flaxnets/host_malloc.py)
FMNIST=/usr/share/datasets/fashion-mnist
DEBS=""
[ -f "$FMNIST/train-images-idx3-ubyte.gz" ] || DEBS="dataset-fashion-mnist"
ls /usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4 >/dev/null 2>&1 || DEBS="$DEBS libtcmalloc-minimal4"
if [ -n "$DEBS" ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  echo "setup: installing Debian packages: ${DEBS# }"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $DEBS >/dev/null
fi

echo "setup: installing Python packages (torch==2.14.1 and torchvision==0.29.1 are pinned)"
python -m pip install -q --disable-pip-version-check -e '.[dev]'
# the CPU convolutions through oneDNN (flaxnets/xla_cpu/onednn.py); without it XLA's own run
echo "setup: building the oneDNN convolution extension"
python -m flaxnets.xla_cpu.onednn_build || echo "setup: continuing without it"
echo "setup: done"
