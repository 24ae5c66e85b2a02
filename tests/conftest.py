"""Shared fixtures: tests run on the CPU in float32, as the parity tolerances assume."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Tests import TensorFlow (tfds mock data) and torchvision in the same worker: triton must load
# before TensorFlow or torchvision's import segfaults (see flaxnets.data).
from flaxnets.data import load_triton_before_tensorflow  # noqa: E402

load_triton_before_tensorflow()


def pytest_collection_modifyitems(items):
    """The deep nets' tests first: each takes minutes (the longest ~5), and xdist hands tests
    out in this order, so the two workers then finish on short tests together instead of one
    waiting while the other runs a deep net last."""
    from tests.child import DEEP

    items.sort(key=lambda item: getattr(item, "callspec", None) is None
               or item.callspec.params.get("name") not in DEEP)
