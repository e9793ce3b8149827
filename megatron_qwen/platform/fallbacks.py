"""What megatron-core falls back to without Transformer Engine or apex, said once instead of warned many times.

megatron-core warns at import, module by module ("Transformer Engine and Apex are not installed. Falling back to
..."): eighteen lines before a tool has parsed its arguments. ``quiet_fallback_warnings`` silences exactly those
messages (an entry point installs it first), and ``fallback_note`` gives the same facts in one phrase for a
start line. Neither imports torch or megatron-core.
"""
from __future__ import annotations

import importlib.util
import warnings

# The start of every such message in megatron-core 0.16.1 (optimizer, clip_grads, backends, gpt_layer_specs, fsdp)
FALLBACK_WARNING = r"(Transformer Engine and Apex are|Apex is) not installed"


def quiet_fallback_warnings() -> None:
    """Ignores megatron-core's warnings about missing Transformer Engine and apex, for the rest of the process."""
    warnings.filterwarnings("ignore", message=FALLBACK_WARNING)


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
