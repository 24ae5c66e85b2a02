"""parity: weight conversion between torch_ref and flaxnets, and the checks that prove equality."""

from parity.convert import (KEY_ALIASES, RULES, StateDictMismatchError, flax_to_torch, load_state_dict,
                            normalize_keys, to_numpy, to_numpy_state_dict, torch_to_flax)
from parity.files import (ConversionCheckError, Weights, WeightsFileError, convert_file, read_weights,
                          write_weights)

__all__ = ["KEY_ALIASES", "RULES", "ConversionCheckError", "StateDictMismatchError", "Weights",
           "WeightsFileError", "convert_file", "flax_to_torch", "load_state_dict", "normalize_keys",
           "read_weights", "to_numpy", "to_numpy_state_dict", "torch_to_flax", "write_weights"]
