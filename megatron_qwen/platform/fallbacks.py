"""What megatron-core falls back to without Transformer Engine or apex, said once instead of warned many times.

megatron-core warns at import, module by module ("Transformer Engine and Apex are not installed. Falling back to
..."): eighteen lines before a tool has parsed its arguments. ``quiet_fallback_warnings`` silences exactly those
messages (an entry point installs it first), and ``fallback_note`` gives the same facts in one phrase for a
start line. It also silences the deprecation notices that megatron-core 0.16.1's own calls into torch raise on
every rank (ShardedTensor, ``reduce_scatter_tensor``, ``all_gather_into_tensor``, ``load_state_dict``) and its
``cuda_graph_scope`` default: nothing a user of this project can act on. Neither imports torch or megatron-core.
"""
from __future__ import annotations

import importlib.util
import warnings

# The start of every such message in megatron-core 0.16.1 (optimizer, clip_grads, backends, gpt_layer_specs, fsdp)
FALLBACK_WARNING = r"(Transformer Engine and Apex are|Apex is) not installed"


# megatron-core's calls into torch APIs that torch deprecates, and a deprecated default of megatron's own config
LIBRARY_DEPRECATIONS = (
    r"Please use DTensor instead and we are deprecating ShardedTensor",
    r"`torch\.distributed\.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated",
    r"`load_state_dict` is deprecated and will be removed",
    r"full scope is deprecated",
)


def quiet_fallback_warnings() -> None:
    """Ignores megatron-core's warnings about missing Transformer Engine and apex, and the library deprecation
    notices above, for the rest of the process."""
    warnings.filterwarnings("ignore", message=FALLBACK_WARNING)
    for message in LIBRARY_DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message)


def fallback_note() -> str:
    """Which of megatron-core's fallbacks this process uses, as one phrase."""
    has_te = importlib.util.find_spec("transformer_engine") is not None
    has_apex = importlib.util.find_spec("apex") is not None
    if has_te and has_apex:
        return "Transformer Engine and apex installed (no fallbacks)"
    if has_apex:
        return "fallbacks: no Transformer Engine (local layer spec only)"
    if has_te:
        return "fallbacks: no apex (torch norms in the local layer spec)"
    return ("fallbacks: no Transformer Engine or apex (torch AdamW, torch norms, local layer spec, "
            "foreach multi-tensor kernels)")
