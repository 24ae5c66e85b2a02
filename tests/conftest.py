"""Shared fixtures: tests run on the CPU in float32, as the parity tolerances assume."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
