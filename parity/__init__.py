"""parity: weight conversion between torch_ref and flaxnets, and the checks that prove equality."""

from parity.convert import (KEY_ALIASES, RULES, StateDictMismatchError, flax_to_torch, load_state_dict,
                            normalize_keys, to_numpy_state_dict, torch_to_flax)

__all__ = ["KEY_ALIASES", "RULES", "StateDictMismatchError", "flax_to_torch", "load_state_dict",
           "normalize_keys", "to_numpy_state_dict", "torch_to_flax"]
