"""Shared fixtures: tests run on the CPU in float32, as the parity tolerances assume."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# scripts run by tests compile afresh and never write the user's compilation cache; the tests
# of the cache give it a directory of their own
os.environ["FLAXNETS_COMPILE_CACHE"] = "off"

# Tests import TensorFlow (tfds mock data) and torchvision in the same worker: triton must load
# before TensorFlow or torchvision's import segfaults (see flaxnets.data).
from flaxnets.data import load_triton_before_tensorflow  # noqa: E402

load_triton_before_tensorflow()
