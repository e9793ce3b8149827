"""The training configuration: plain dataclasses, recipe files, and command-line flags generated from the fields.

Every field of every section is one flag, spelled like the field (``data_path`` -> ``--data-path``), so field
names are unique across sections. Values are applied in this order, later winning: the defaults below (the
Qwen technical report's SFT recipe, section 3.1.2), a recipe file (``--recipe FILE``: a JSON object of
field names to values), then the flags given on the command line. ``Optional`` fields take ``none`` on the
command line; booleans take ``--flag`` / ``--no-flag``; lists take one or more values. A numeric field's
``Bounds`` (its range, finite) are checked with the rest of the configuration, naming the flag.

Megatron-LM's spellings of the same settings are accepted too (``MEGATRON_ALIASES``, one entry each; where the
meaning differs, the entry says how, and docs/training.md lists them). Flags are never abbreviated: an unknown one
is refused naming the closest known flag.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib.util
import json
import math
import types
import typing
from pathlib import Path
from typing import Literal, Optional

from megatron_qwen.models.presets import PRESETS
from megatron_qwen.platform.paths import folder_problem


@dataclasses.dataclass(frozen=True)
class Bounds:
    """The values a numeric setting (each value, for a list) may take: finite, at least ``low`` (above it when
    ``low_open``), and below ``high`` when given."""

    low: float
    low_open: bool = False
    high: float | None = None

    def __str__(self) -> str:
        if self.high is not None:
            return f"in {'(' if self.low_open else '['}{self.low}, {self.high})"
        return f"{'above' if self.low_open else 'at least'} {self.low}"

    def problem(self, value) -> str | None:
        """What is wrong with ``value`` (``None``: nothing)."""
        if not math.isfinite(value):
            return f"must be finite and {self}, got {value}"
        low_ok = value > self.low if self.low_open else value >= self.low
        return None if low_ok and (self.high is None or value < self.high) else f"must be {self}, got {value}"


AT_LEAST_1, AT_LEAST_0, ABOVE_0 = Bounds(1), Bounds(0), Bounds(0, low_open=True)
FRACTION = Bounds(0, high=1)  # [0, 1)


def setting(default, help: str, bounds: Bounds | None = None):
    metadata = {"help": help, "bounds": bounds}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass
class ModelSettings:
    preset: Optional[str] = setting(
        None, f"model preset ({', '.join(PRESETS)}); default: read from the pretrained checkpoint"
    )
    dropout: float = setting(0.1, "dropout on hidden states and attention probabilities", FRACTION)
    precision: Literal["bf16", "fp32"] = setting("bf16", "parameter and compute dtype")
    fp8: bool = setting(False, "FP8 matrix multiplications through Transformer Engine")
    recompute: Literal["none", "selective", "full"] = setting("none", "activation recomputation")
    kernel_fusions: Optional[bool] = setting(
        None,
        "torch.compile'd SwiGLU, bias-dropout-add and RoPE; none: on GPUs where a start-up probe compiles, off on "
        "the CPU",
    )
    moe_aux_loss_coeff: float = setting(
        0.0, "mixture of experts: weight of the load-balancing loss per MoE layer, per supervised token "
        "(docs/training.md; 0: none, as a transformers finetune of the published configs)", AT_LEAST_0
    )
    moe_z_loss_coeff: Optional[float] = setting(
        None, "mixture of experts: weight of the router z-loss per MoE layer, per supervised token (none: off)",
        ABOVE_0
    )


@dataclasses.dataclass
class ParallelSettings:
    tensor_parallel: int = setting(1, "tensor-parallel size", AT_LEAST_1)
    pipeline_parallel: int = setting(1, "pipeline-parallel size (1F1B schedule)", AT_LEAST_1)
    virtual_pipeline: Optional[int] = setting(None, "model chunks per pipeline stage (interleaved 1F1B)", AT_LEAST_1)
    expert_parallel: int = setting(1, "expert-parallel size: ranks the experts of a mixture of experts are split over",
                                   AT_LEAST_1)
    expert_tensor_parallel: Optional[int] = setting(
        None, "tensor-parallel size inside each expert (none: --tensor-parallel)", AT_LEAST_1
    )
    moe_token_dispatcher_type: Optional[Literal["alltoall", "allgather"]] = setting(
        None, "how tokens reach the experts of a mixture of experts (none: alltoall, or allgather where gloo "
        "cannot run alltoall: expert-TP and EP both above 1)"
    )
    sequence_parallel: bool = setting(False, "sequence parallelism (needs tensor_parallel > 1)")
    distributed_optimizer: bool = setting(True, "shard optimizer state over data-parallel ranks")
    distributed_timeout_minutes: float = setting(
        30.0, "how long a collective waits for the slowest rank before the run fails (checkpoint saves included)",
        ABOVE_0,
    )


@dataclasses.dataclass
class OptimizerSettings:
    lr: float = setting(2e-6, "peak learning rate", AT_LEAST_0)
    min_lr: float = setting(0.0, "learning rate reached at the last update by cosine or linear decay", AT_LEAST_0)
    warmup_steps: int = setting(1430, "update k of the warmup uses lr * k / warmup_steps", AT_LEAST_0)
    warmup_fraction: Optional[float] = setting(
        None, "warmup as a fraction of the run's updates, rounded up (instead of --warmup-steps)", FRACTION
    )
    lr_decay_style: Literal["constant", "cosine", "linear"] = setting("constant", "after the warmup")
    override_schedule: bool = setting(
        False,
        "at a resume, schedule the rest of the run by these settings (--lr, --min-lr, warmup, updates, decay, weight "
        "decay) from the resumed update on, instead of refusing ones that differ from the run's: continues a "
        "finished run to more updates with its optimizer state",
    )
    adam_beta1: float = setting(0.9, "AdamW beta1", FRACTION)
    adam_beta2: float = setting(0.95, "AdamW beta2", FRACTION)
    adam_eps: float = setting(1e-8, "AdamW epsilon", ABOVE_0)
    weight_decay: float = setting(0.1, "AdamW weight decay", AT_LEAST_0)
    clip_grad: float = setting(1.0, "gradient clipping by global norm (0: none)", AT_LEAST_0)


@dataclasses.dataclass
class DataSettings:
    data_path: list[str] = setting([], "dataset PREFIX(es) written by tools/preprocess_chatml.py")
    data_weights: Optional[list[float]] = setting(
        None, "blending weights, one per PREFIX; default: by size", AT_LEAST_0
    )
    valid_fraction: float = setting(
        0.01, "fraction of each dataset's conversations held out for validation", FRACTION
    )
    valid_data_path: list[str] = setting([], "datasets for validation only, each reported as a loss of its own")
    rows: Literal["pad", "pack", "padfree"] = setting(
        "padfree",
        "pad: one conversation per row; pack: rows packed best-fit from the stream; padfree: pad's conversations "
        "and updates, packed into as few rows as hold them",
    )
    seq_length: int = setting(2048, "model positions per row", AT_LEAST_1)
    pad_token_id: int = setting(151643, "token id of padding (never supervised)", AT_LEAST_0)
    tokenizer: Optional[str] = setting(None, "the model's tokenizer, checked against the datasets' stats")


@dataclasses.dataclass
class TrainingSettings:
    train_steps: int = setting(4000, "optimizer updates (not used with --train-epochs)", AT_LEAST_1)
    train_epochs: Optional[float] = setting(
        None, "run length in passes over the training conversations: the fewest updates that draw this many", ABOVE_0
    )
    global_batch_size: int = setting(
        128, "conversations per update (--rows pad, padfree) or rows (--rows pack)", AT_LEAST_1
    )
    micro_batch_size: int = setting(
        1, "rows per micro-batch (gradient accumulation fills the global batch)", AT_LEAST_1
    )
    seed: int = setting(1234, "seed of weights-independent randomness: data order, dropout", Bounds(0, high=2**32))
    eval_interval: int = setting(
        200, "updates between validation losses, and one after the last update (0: never)", AT_LEAST_0
    )
    eval_conversations: Optional[int] = setting(
        1024,
        "conversations of each validation set a validation runs on: the same random sample each time (none: all)",
        AT_LEAST_1,
    )
    log_interval: int = setting(1, "updates between log lines", AT_LEAST_1)
    tensorboard_dir: Optional[str] = setting(
        None, "TensorBoard event files and metrics.jsonl (default: SAVE_DIR/tensorboard)"
    )
    wandb_project: Optional[str] = setting(
        None, "also log the figures and the settings to this Weights & Biases project (pip install wandb; "
        "WANDB_MODE=offline keeps them in the metrics folder)"
    )


@dataclasses.dataclass
class CheckpointSettings:
    pretrained_checkpoint: Optional[str] = setting(None, "converter output to start from (finetune semantics)")
    save_dir: Optional[str] = setting(None, "where checkpoints go; a run resumes from the latest one there")
    save_interval: int = setting(500, "updates between checkpoints (and one at the end)", AT_LEAST_1)
    save_interval_minutes: Optional[float] = setting(
        None, "also save at the first update this many minutes after the last save (or the start)", ABOVE_0
    )
    keep_last: int = setting(2, "checkpoints kept (older ones are deleted)", AT_LEAST_1)
    skip_verify: bool = setting(
        False, "start from a checkpoint without checking its files against its manifest (sizes, sha256)"
    )


@dataclasses.dataclass
class RunConfig:
    model: ModelSettings = dataclasses.field(default_factory=ModelSettings)
    parallel: ParallelSettings = dataclasses.field(default_factory=ParallelSettings)
    optimizer: OptimizerSettings = dataclasses.field(default_factory=OptimizerSettings)
    data: DataSettings = dataclasses.field(default_factory=DataSettings)
    training: TrainingSettings = dataclasses.field(default_factory=TrainingSettings)
    checkpoint: CheckpointSettings = dataclasses.field(default_factory=CheckpointSettings)

    def validate(self) -> "RunConfig":
        """Raises ``ValueError`` naming the flag of the first inconsistent value; returns ``self``."""
        _raise_first(_problems(self))
        return self

    def check_model(self, model) -> None:
        """Raises ``ValueError`` naming the flag when the run does not fit ``model`` (a ``QwenConfig``, known once
        the preset or checkpoint is read), before anything of that size is allocated."""
        _raise_first(_model_problems(self, model))

    def data_parallel_size(self, world_size: int) -> int:
        parallel = self.parallel
        model_parallel = parallel.tensor_parallel * parallel.pipeline_parallel
        if world_size % model_parallel:
            raise ValueError(f"world size {world_size} is not a multiple of TP x PP = {model_parallel}")
        experts = (parallel.expert_tensor_parallel or parallel.tensor_parallel) * parallel.expert_parallel
        if world_size % (experts * parallel.pipeline_parallel):
            raise ValueError(f"--expert-parallel {parallel.expert_parallel}: world size {world_size} is not a multiple "
                             f"of expert-TP x EP x PP = {experts * parallel.pipeline_parallel}")
        return world_size // model_parallel

    def row_multiple(self, world_size: int) -> int:
        """What an update's row count must be a multiple of: data-parallel size x micro-batch size, so every rank
        runs the same number of micro-batches, times the pipeline size for the interleaved schedule (megatron's
        interleaving takes whole groups of pipeline-size micro-batches)."""
        interleaved = self.parallel.pipeline_parallel if self.parallel.virtual_pipeline else 1
        return self.data_parallel_size(world_size) * self.training.micro_batch_size * interleaved

    def num_micro_batches(self, world_size: int) -> int | None:
        """Gradient-accumulation steps per update on ``world_size`` ranks of the configured layout; ``None`` with
        ``--rows padfree``, where they follow the lengths of each update's conversations."""
        data_parallel = self.data_parallel_size(world_size)
        if self.data.rows == "padfree":
            return None
        per_step = data_parallel * self.training.micro_batch_size
        if self.training.global_batch_size % per_step:
            raise ValueError(
                f"--global-batch-size {self.training.global_batch_size} is not a multiple of data-parallel size "
                f"{data_parallel} x --micro-batch-size {self.training.micro_batch_size}"
            )
        return self.training.global_batch_size // per_step

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def settings(self) -> dict:
        """Every setting by its field name, as a recipe file holds them."""
        return {field.name: getattr(getattr(self, section), field.name) for section, field, _ in _fields()}


def _bounds_problem(field, value) -> str | None:
    """What is wrong with a setting's value by its field's ``Bounds`` (``None`` when unset or none)."""
    bounds = field.metadata["bounds"]
    if bounds is None or value is None:
        return None
    return next(filter(None, map(bounds.problem, value if isinstance(value, list) else [value])), None)


def _problems(config: RunConfig):
    """(problem or a false value, field name) pairs; lazily, so later checks may rely on earlier ones."""
    model, parallel, data, training = config.model, config.parallel, config.data, config.training
    for section, field, _ in _fields():
        yield _bounds_problem(field, getattr(getattr(config, section), field.name)), field.name
    checkpoint = config.checkpoint
    yield model.preset is not None and model.preset not in PRESETS and f"unknown preset {model.preset!r}", "preset"
    yield model.preset is None and checkpoint.pretrained_checkpoint is None and checkpoint.save_dir is None and (
        "no preset and no checkpoint to read the model from"
    ), "preset"
    yield folder_problem(checkpoint.save_dir), "save_dir"
    yield folder_problem(training.tensorboard_dir), "tensorboard_dir"
    yield training.wandb_project is not None and importlib.util.find_spec("wandb") is None and (
        "needs the wandb package (pip install wandb)"
    ), "wandb_project"
    yield parallel.sequence_parallel and parallel.tensor_parallel < 2 and (
        "needs --tensor-parallel above 1"
    ), "sequence_parallel"
    yield parallel.virtual_pipeline is not None and parallel.pipeline_parallel < 2 and (
        "needs --pipeline-parallel above 1"
    ), "virtual_pipeline"
    yield config.optimizer.min_lr > config.optimizer.lr and f"above --lr {config.optimizer.lr}", "min_lr"
    yield not data.data_path and "no dataset given", "data_path"
    yield data.data_weights is not None and len(data.data_weights) != len(data.data_path) and (
        f"{len(data.data_weights)} weight(s) for {len(data.data_path)} dataset(s)"
    ), "data_weights"
    yield data.data_weights is not None and not sum(data.data_weights) and "all zero", "data_weights"
    yield data.rows != "padfree" and training.global_batch_size % training.micro_batch_size and (
        f"{training.global_batch_size} is not a multiple of --micro-batch-size {training.micro_batch_size}"
    ), "global_batch_size"
    optimizer = config.optimizer
    # otherwise the run's length is known only once the data is read (Trainer.run_length)
    fixed_length = training.train_epochs is None and optimizer.warmup_fraction is None
    yield fixed_length and optimizer.warmup_steps >= training.train_steps and (
        f"must be below --train-steps {training.train_steps}"
    ), "warmup_steps"


def _model_problems(config: RunConfig, model):
    parallel = config.parallel
    yield config.data.seq_length > model.max_position_embeddings and (
        f"{config.data.seq_length} is above the {model.max_position_embeddings} positions of {model.name}"
    ), "seq_length"
    stages = parallel.pipeline_parallel * (parallel.virtual_pipeline or 1)
    yield model.num_layers % stages and (
        f"the {model.num_layers} layers of {model.name} do not split evenly into {stages} stages"
        + (f" (x --virtual-pipeline {parallel.virtual_pipeline})" if parallel.virtual_pipeline else "")
    ), "pipeline_parallel"
    for part in ("num_attention_heads", "num_query_groups", "ffn_hidden_size"):
        count = getattr(model, part)
        yield count % parallel.tensor_parallel and (
            f"{model.name}'s {count} {part.replace('_', ' ')} do not split evenly over {parallel.tensor_parallel} ranks"
        ), "tensor_parallel"
    yield from expert_parallel_problems(model, parallel.tensor_parallel, parallel.expert_parallel,
                                        parallel.expert_tensor_parallel)
    yield model.is_moe and parallel.tensor_parallel > 1 and not parallel.sequence_parallel and (
        "megatron-core trains mixture-of-experts layers at --tensor-parallel above 1 only with sequence parallelism"
    ), "sequence_parallel"
    per_stage = model.num_layers // stages if not model.num_layers % stages else 0
    dense_stage = model.is_moe and stages > 1 and per_stage and next(
        (stage for stage in range(stages)
         if not any(model.is_moe_layer(layer) for layer in range(stage * per_stage, (stage + 1) * per_stage))), None)
    yield dense_stage is not None and dense_stage is not False and (
        f"stage {dense_stage} of {stages} would hold none of {model.name}'s mixture-of-experts layers: its ranks' "
        "optimizer would then have no expert part, unlike the others' (megatron-core's collectives then mismatch)"
    ), "pipeline_parallel"
    for name in ("moe_aux_loss_coeff", "moe_z_loss_coeff", "moe_token_dispatcher_type"):
        section = config.parallel if name == "moe_token_dispatcher_type" else config.model
        yield not model.is_moe and getattr(section, name) and f"{model.name} has no experts", name


def expert_parallel_problems(model, tensor_parallel: int, expert_parallel: int, expert_tensor_parallel: int | None):
    """(problem or a false value, field name) pairs of an expert layout that does not fit ``model`` (also used by
    ``megatron-qwen verify``)."""
    yield expert_parallel > 1 and not model.is_moe and f"{model.name} has no experts", "expert_parallel"
    yield model.is_moe and model.num_experts % expert_parallel and (
        f"{model.name}'s {model.num_experts} experts do not split evenly over {expert_parallel} ranks"
    ), "expert_parallel"
    expert_tp = expert_tensor_parallel or tensor_parallel
    yield model.is_moe and model.moe_ffn_hidden_size % expert_tp and (
        f"{model.name}'s experts' FFN of {model.moe_ffn_hidden_size} does not split evenly over {expert_tp} ranks"
    ), "expert_tensor_parallel"


def _raise_first(problems) -> None:
    for problem, flag in problems:
        if problem:
            raise ValueError(f"{_flag(flag)}: {problem}")


# ---- flags and recipe files, generated from the fields ----


def _sections(config_class=RunConfig):
    hints = typing.get_type_hints(config_class)
    return [(field.name, hints[field.name]) for field in dataclasses.fields(config_class)]


def _fields():
    """(section name, field, resolved type) of every setting; field names are flags, so they must be unique."""
    found, seen = [], set()
    for section, section_class in _sections():
        hints = typing.get_type_hints(section_class)
        for field in dataclasses.fields(section_class):
            assert field.name not in seen, f"setting {field.name} appears in two sections"
            seen.add(field.name)
            found.append((section, field, hints[field.name]))
    return found


def _unwrap_optional(kind):
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in args:
        return next(arg for arg in args if arg is not type(None)), True
    return kind, False


def _convert(kind, value, where: str):
    """``value`` (a command-line string, or a JSON value) as ``kind``; ``ValueError`` naming ``where``."""
    inner, optional = _unwrap_optional(kind)
    if optional and value == ["none"] and typing.get_origin(inner) is list:
        value = None  # a list flag given as `--flag none`
    if value is None or (optional and isinstance(value, str) and value.lower() == "none"):
        if optional:
            return None
        raise ValueError(f"{where}: may not be none")
    origin = typing.get_origin(inner)
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected a list, got {value!r}")
        return [_convert(typing.get_args(inner)[0], item, where) for item in value]
    if origin is Literal:
        if value not in typing.get_args(inner):
            raise ValueError(f"{where}: expected one of {typing.get_args(inner)}, got {value!r}")
        return value
    if inner is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    try:
        if inner in (int, float) and isinstance(value, bool):
            raise TypeError
        converted = inner(value)
        if inner is int and isinstance(value, float) and converted != value:
            raise TypeError
        return converted
    except (TypeError, ValueError):
        raise ValueError(f"{where}: expected {inner.__name__}, got {value!r}") from None


COMMAND_LINE = "command line"
PROG = "python -m megatron_qwen.train"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclasses.dataclass(frozen=True)
class Alias:
    """Megatron-LM's ``flag``, accepted for the setting ``setting`` (a field name, or ``LOAD``): it takes a value
    as that setting's flag does, or, for a switch, sets ``value``. ``differs``: how its meaning here differs from
    Megatron-LM's (empty: the same)."""

    flag: str
    setting: str
    differs: str = ""
    value: object = None


LOAD = "load"  # Megatron-LM's --load, which means one of two settings here (_apply_load)
_ONE_DROPOUT = "one dropout here, on hidden states and attention probabilities: different {} and {} are refused"

MEGATRON_ALIASES = (
    Alias("--tensor-model-parallel-size", "tensor_parallel"),
    Alias("--pipeline-model-parallel-size", "pipeline_parallel"),
    Alias("--virtual-pipeline-model-parallel-size", "virtual_pipeline"),
    Alias("--expert-model-parallel-size", "expert_parallel"),
    Alias("--expert-tensor-parallel-size", "expert_tensor_parallel"),
    Alias("--use-distributed-optimizer", "distributed_optimizer", "on by default here", value=True),
    Alias("--train-iters", "train_steps"),
    Alias("--lr-warmup-iters", "warmup_steps"),
    Alias("--lr-warmup-fraction", "warmup_fraction", "a fraction of the run's updates, rounded up"),
    Alias("--bf16", "precision", "bf16 is the default here", value="bf16"),
    Alias("--recompute-granularity", "recompute"),
    Alias("--hidden-dropout", "dropout", _ONE_DROPOUT.format("--hidden-dropout", "--attention-dropout")),
    Alias("--attention-dropout", "dropout", _ONE_DROPOUT.format("--hidden-dropout", "--attention-dropout")),
    Alias("--save", "save_dir", "a run also resumes from its latest checkpoint there"),
    Alias("--load", LOAD, "the --save folder: resume (as any run does); another folder: --pretrained-checkpoint"),
    Alias("--override-opt_param-scheduler", "override_schedule", value=True),
)


def _help_suffix(field) -> str:
    """`` (default: VALUE, RANGE)``, without the default where the help text already says it."""
    parts = [] if "default:" in field.metadata["help"] else [f"default: {_default(field)}"]
    if field.metadata["bounds"]:
        parts.append(str(field.metadata["bounds"]))
    return f" ({', '.join(parts)})" if parts else ""


def _value_options(kind) -> dict:
    """How argparse reads a value of ``kind``."""
    inner, _ = _unwrap_optional(kind)
    if inner is bool:
        return {"action": argparse.BooleanOptionalAction}
    if typing.get_origin(inner) is list:
        return {"nargs": "+"}
    if typing.get_origin(inner) is Literal:
        return {"choices": typing.get_args(inner)}
    return {}


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, usage="%(prog)s [--recipe NAME|FILE] [--flag VALUE ...]",
        description="Supervised finetuning of a Qwen model on megatron-core.",
        argument_default=argparse.SUPPRESS, allow_abbrev=False,
    )
    parser.add_argument("--recipe", help="JSON file of settings (field name -> value), applied before the flags; "
                                         "also a run's SAVE_DIR/run_config.json, or NAME of a shipped recipe")
    kinds = {}
    for section, field, kind in _fields():
        kinds[field.name] = kind
        help = f"[{section}] {field.metadata['help']}{_help_suffix(field)}"
        parser.add_argument(_flag(field.name), dest=field.name, help=help, **_value_options(kind))
    megatron = parser.add_argument_group("Megatron-LM's spellings (docs/training.md: where the meaning differs)")
    for alias in MEGATRON_ALIASES:
        ours = "--save-dir or --pretrained-checkpoint" if alias.setting == LOAD else _flag(alias.setting)
        help = f"= {ours}" + (f": {alias.differs}" if alias.differs else "")
        if alias.value is not None:
            options = {"action": "store_const", "const": alias.value}
        else:
            options = _value_options(kinds.get(alias.setting, str))
        megatron.add_argument(alias.flag, dest=alias.flag, help=help, **options)
    return parser


def _refuse_extras(extras: list[str], known: list[str]) -> None:
    """A one-line error for the first argument the parser did not take, naming the closest known flag."""
    if not extras:
        return
    if extras[0].startswith("-"):
        flag = extras[0].split("=", 1)[0]
        closest = difflib.get_close_matches(flag, known, n=1)
        raise ValueError(f"{flag}: unknown flag" + (f"; did you mean {closest[0]}?" if closest else ""))
    raise ValueError(f"{extras[0]!r}: a value that no flag takes")


def _merge_aliases(given: dict) -> dict:
    """``given`` with the Megatron-LM spellings under the settings they stand for; two spellings of one setting
    with different values are refused."""
    kinds = {field.name: kind for _, field, kind in _fields()}
    spelled = {name: _flag(name) for name in given}
    for alias in MEGATRON_ALIASES:
        if alias.flag not in given:
            continue
        value = given.pop(alias.flag)
        if alias.setting in kinds:
            value = _convert(kinds[alias.setting], value, alias.flag)
        if alias.setting in given:
            earlier = given[alias.setting]
            if alias.setting in kinds:
                earlier = _convert(kinds[alias.setting], earlier, spelled[alias.setting])
            if earlier != value:
                raise ValueError(f"{alias.flag} {value} and {spelled[alias.setting]} {earlier}: both set "
                                 f"{_flag(alias.setting)}" + (f" ({alias.differs})" if alias.differs else ""))
        given[alias.setting], spelled[alias.setting] = value, alias.flag
    return given


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _split_weighted_data_path(given: dict) -> None:
    """Megatron-LM's ``--data-path W1 PREFIX1 W2 PREFIX2 ...`` as ``data_weights`` and ``data_path``."""
    items = given.get("data_path")
    if not items or len(items) % 2 or not all(map(_is_number, items[::2])) or any(map(_is_number, items[1::2])):
        return
    if "data_weights" in given:
        raise ValueError("--data-path: weighted (WEIGHT PREFIX ...) and --data-weights given; give the weights once")
    given["data_weights"], given["data_path"] = items[::2], items[1::2]


def command_line_settings(argv: list[str] | None, prog: str = PROG) -> dict:
    """The settings the command line gives (field name -> value, ``recipe`` and ``LOAD`` too), Megatron-LM's
    spellings resolved."""
    parser = build_parser(prog)
    namespace, extras = parser.parse_known_args(argv)
    _refuse_extras(extras, list(parser._option_string_actions))
    given = _merge_aliases(vars(namespace))
    _split_weighted_data_path(given)
    return given


def _apply_load(config: RunConfig, load: str, given: dict) -> None:
    """Megatron-LM's ``--load``: nothing more when it is the save directory (a run resumes from there), else the
    checkpoint to start from."""
    save_dir = config.checkpoint.save_dir
    if save_dir is not None and Path(load).resolve() == Path(save_dir).resolve():
        return
    pretrained = given.get("pretrained_checkpoint")
    if pretrained is not None and Path(pretrained).resolve() != Path(load).resolve():
        raise ValueError(f"--load {load}: neither the save directory nor --pretrained-checkpoint {pretrained}")
    config.checkpoint.pretrained_checkpoint = load


def _default(field):
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


def apply_settings(config: RunConfig, settings: dict, source: str) -> RunConfig:
    """``config`` with ``settings`` (field name -> value) applied; unknown names and bad values name ``source``
    and the setting (as its flag when ``source`` is the command line)."""
    known = {field.name: (section, kind) for section, field, kind in _fields()}
    for name, value in settings.items():
        if name not in known:
            raise ValueError(f"{source}: unknown setting {name!r}")
        section, kind = known[name]
        where = _flag(name) if source == COMMAND_LINE else f"{source}: {name}"
        setattr(getattr(config, section), name, _convert(kind, value, where))
    return config


RUN_CONFIG_SETTINGS = "settings"  # where a run's run_config.json (training/run_config.py) holds them


RECIPES = Path(__file__).parent / "recipes"  # the shipped recipes, package data


def recipe_path(recipe: str | Path) -> Path:
    """``--recipe``'s file: the one given when it exists, else the shipped recipe of that name (RECIPES/NAME.json)."""
    path = Path(recipe)
    if path.exists():
        return path
    shipped = RECIPES / f"{str(recipe).removesuffix('.json')}.json"
    if not shipped.is_file():
        names = ", ".join(sorted(path.stem for path in RECIPES.glob("*.json")))
        raise ValueError(f"--recipe {recipe}: no such file, nor a shipped recipe ({names})")
    return shipped


def load_recipe(recipe: str | Path) -> dict:
    """A recipe's settings (``recipe_path``): a JSON object of settings, or a run's ``run_config.json`` (its
    ``settings``)."""
    path = recipe_path(recipe)
    try:
        settings = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"recipe {path}: unreadable ({error})") from error
    if isinstance(settings, dict) and isinstance(settings.get(RUN_CONFIG_SETTINGS), dict):
        settings = settings[RUN_CONFIG_SETTINGS]
    if not isinstance(settings, dict):
        raise ValueError(f"recipe {path}: expected a JSON object of settings")
    return settings


def parse_config(argv: list[str] | None = None, prog: str = PROG) -> RunConfig:
    """Defaults, then the recipe file, then the command line; validated."""
    given = command_line_settings(argv, prog)
    config = RunConfig()
    recipe, load = given.pop("recipe", None), given.pop(LOAD, None)
    if recipe is not None:
        apply_settings(config, load_recipe(recipe), f"recipe {recipe}")
    apply_settings(config, given, COMMAND_LINE)
    if load is not None:
        _apply_load(config, load, given)
    return config.validate()
