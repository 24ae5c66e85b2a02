"""Shared fixtures: tests run on the CPU in float32, as the parity tolerances assume."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Tests import TensorFlow (tfds mock data) and torchvision in the same worker: triton must load
# before TensorFlow or torchvision's import segfaults (see flaxnets.data).
from flaxnets.data import load_triton_before_tensorflow  # noqa: E402

load_triton_before_tensorflow()
