"""A rank's model chunks for a run: what the run's model and parallel settings mean for megatron-core's
``TransformerConfig`` (precision, dropout, recomputation, FP8, sequence parallelism, kernel fusions, a mixture of
experts' token dispatcher and router losses) and one ``GPTModel`` per virtual pipeline stage.
"""
from __future__ import annotations

import torch

from megatron.core import parallel_state

from megatron_qwen.config import ModelSettings, ParallelSettings
from megatron_qwen.models.build import build_model, transformer_config
from megatron_qwen.models.fusions import FUSED_KERNELS, choose_kernel_fusions, compile_probe
from megatron_qwen.models.presets import QwenConfig
from megatron_qwen.models.spec import default_layer_impl
from megatron_qwen.platform import distributed
from megatron_qwen.platform.wgrad_accumulation import provide_wgrad_accumulation


def model_fusions(kernel_fusions: bool, params_dtype: torch.dtype) -> dict:
    """The ``TransformerConfig`` fusions, as Megatron-LM sets them by default: ``FUSED_KERNELS`` when
    ``kernel_fusions`` (``models/fusions.py``), and on GPUs weight-gradient GEMMs that accumulate straight into the
    float32 ``main_grad`` instead of writing a bf16 gradient that DDP then adds in (``gradient_accumulation_fusion``:
    apex's extension where it is installed, as in NGC containers, else torch's ``addmm`` where this torch build
    accumulates ``params_dtype`` products into float32, see ``platform/wgrad_accumulation.py``)."""
    fusions = dict(FUSED_KERNELS) if kernel_fusions else {}
    if torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
        fusions["gradient_accumulation_fusion"] = provide_wgrad_accumulation(device, params_dtype)
    return fusions


def kernel_fusions(requested: bool | None) -> tuple[bool, str]:
    """``--kernel-fusions`` decided for this machine, the same on every rank: (on, why)."""
    cuda = torch.cuda.is_available()

    def agreed_probe() -> str | None:
        failure = compile_probe(torch.cuda.current_device() if cuda else "cpu")
        (anywhere,) = distributed.on_any_rank(failure is not None)
        return failure or ("failed on another rank" if anywhere else None)

    return choose_kernel_fusions(requested, "cuda" if cuda else "cpu", agreed_probe)


def params_dtype(settings) -> torch.dtype:
    """The weights' dtype for the run's ``ModelSettings``."""
    return torch.bfloat16 if settings.precision == "bf16" else torch.float32


def token_dispatcher(requested: str | None) -> tuple[str, str]:
    """How a mixture of experts' tokens reach their experts at the current layout: (megatron's dispatcher, why).

    megatron's ``alltoall`` (its default in Megatron-LM) sends each token only to the ranks of its experts;
    ``allgather`` gives every expert rank all tokens. At expert-TP and EP both above 1, ``alltoall`` all-gathers
    the expert-TP ranks' token counts, which differ, and gloo refuses an all_gather of uneven sizes."""
    expert_parallel = parallel_state.get_expert_model_parallel_world_size()
    expert_tensor_parallel = parallel_state.get_expert_tensor_parallel_world_size()
    uneven_gather = torch.distributed.get_backend() == "gloo" and expert_parallel > 1 and expert_tensor_parallel > 1
    if uneven_gather and requested == "alltoall":
        raise ValueError(f"--moe-token-dispatcher-type alltoall: at expert-TP {expert_tensor_parallel} x EP "
                         f"{expert_parallel} it all-gathers uneven token counts, which gloo (the CPU backend) refuses; "
                         "use allgather")
    if requested is not None:
        return requested, "--moe-token-dispatcher-type"
    if uneven_gather:
        return "allgather", (f"gloo cannot all_gather the uneven token counts alltoall needs at expert-TP "
                             f"{expert_tensor_parallel} x EP {expert_parallel}")
    return "alltoall", "megatron's default"


def build_chunks(model: QwenConfig, settings: ModelSettings, parallel: ParallelSettings, fused: bool = False) -> list:
    """This rank's model chunks (one, or ``virtual_pipeline`` for the interleaved schedule), on this rank's device;
    ``fused``: with the compile-based kernel fusions (``kernel_fusions``)."""
    experts = {}
    if model.is_moe:  # no capacity factor: no token is dropped
        experts = dict(moe_token_dispatcher_type=token_dispatcher(parallel.moe_token_dispatcher_type)[0],
                       moe_aux_loss_coeff=settings.moe_aux_loss_coeff, moe_z_loss_coeff=settings.moe_z_loss_coeff)
    impl = default_layer_impl()
    if settings.fp8 and impl != "te":
        raise ValueError("--fp8 needs Transformer Engine on a GPU, which is not available here")
    recompute = {
        "none": {},
        "selective": {"recompute_granularity": "selective"},
        "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
    }[settings.recompute]
    fp8 = {"fp8": "hybrid", "fp8_amax_history_len": 1024, "fp8_amax_compute_algo": "max"} if settings.fp8 else {}
    model_config = transformer_config(
        model,
        params_dtype=params_dtype(settings),
        bf16=settings.precision == "bf16",
        attention_dropout=settings.dropout,
        hidden_dropout=settings.dropout,
        sequence_parallel=parallel.sequence_parallel,
        calculate_per_token_loss=True,
        **recompute,
        **fp8,
        **experts,
        **model_fusions(fused, params_dtype(settings)),
    )
    stages = parallel.virtual_pipeline or 1
    chunks = [
        build_model(model, layer_impl=impl, config=model_config, vp_stage=stage if stages > 1 else None)
        for stage in range(stages)
    ]
    if torch.cuda.is_available():
        chunks = [chunk.cuda() for chunk in chunks]
    for chunk in chunks:
        _mark_expert_parameters(chunk)
    return chunks


def _mark_expert_parameters(chunk) -> None:
    """Routed experts' parameters as expert-parallel ones at every EP size. megatron-core marks them so only at EP
    above 1 (``allreduce=False``), which decides both their data-parallel group and the optimizer's parts: at EP 1
    the optimizer would be one part instead of two (dense, experts), whose checkpoint names differ, so a run could
    not resume at another EP size; and the experts' gradients would be reduced over the dense data-parallel group,
    which is not theirs when expert-TP differs from TP."""
    for module in chunk.modules():
        if getattr(module, "is_expert", False):
            for param in module.parameters(recurse=False):
                param.allreduce = False


def fusions_in_use(chunks: list) -> list[str]:
    """The ``model_fusions`` switches the built model's ``TransformerConfig`` has on (for the start line)."""
    names = (*FUSED_KERNELS, "gradient_accumulation_fusion")
    return [name for name in names if getattr(chunks[0].config, name)]
