"""parity: weight conversion between PyTorch and Flax NNX models, and the checks that prove equality."""

from typing import Any

from parity.convert import (KEY_ALIASES, RULES, StateDictMismatchError, UnsupportedLayerError, flax_to_torch,
                            load_state_dict, normalize_keys, to_numpy, to_numpy_state_dict, torch_to_flax)
from parity.files import (ConversionCheckError, Weights, WeightsFileError, convert_file, read_weights,
                          write_weights)

__all__ = ["KEY_ALIASES", "RULES", "CompareReport", "ConversionCheckError", "StateDictMismatchError",
           "UnsupportedLayerError", "Weights", "WeightsFileError", "compare", "convert_file", "flax_input",
           "flax_to_torch", "load_state_dict", "normalize_keys", "read_weights", "to_numpy",
           "to_numpy_state_dict", "torch_to_flax", "write_weights"]


def __getattr__(name: str) -> Any:
    # parity.comparison imports torch: loaded on first use, so that `import parity` (a JAX run
    # writing its weight files) stays torch-free.
    if name in ("compare", "CompareReport", "flax_input"):
        import importlib

        return getattr(importlib.import_module("parity.comparison"), name)
    raise AttributeError(f"module 'parity' has no attribute {name!r}")
