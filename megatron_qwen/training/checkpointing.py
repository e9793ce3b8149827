"""The trainer's checkpoints in the shared layout (``checkpoint/layout.py``): what a run starts from, saving,
resuming, and the clear errors for checkpoints that cannot be used.

An iteration the trainer writes holds, next to the model weights (at the same names the converter writes, so
``convert_checkpoint.py mcore-to-hf`` exports it and any TP/PP layout loads it):

- ``optimizer``: megatron's optimizer state (``training/optimizer.py``);
- ``rng_state``: every rank's RNG states (``training/rng.py``);
- ``trainer_state.json``: the iteration, the learning-rate schedule, the data position and the parallel
  layout that saved it.

Where a run starts (``start_point``): the latest checkpoint of ``--save-dir`` when there is one (a resume:
everything is restored, ``--pretrained-checkpoint`` is ignored; iterations there that no readable ``latest`` names
stop the run), else ``--pretrained-checkpoint`` (finetune
semantics: weights only; iteration, optimizer, schedule and data start fresh), else random weights from
``--preset``. RNG states are restored only at the layout and on the kind of device (GPU or CPU) that saved them; otherwise each
rank's RNG continues from the run's seed (megatron's own rule for another layout).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory
from torch.distributed.checkpoint.api import CheckpointException

from megatron_qwen.checkpoint import layout, manifest
from megatron_qwen.config import CheckpointSettings
from megatron_qwen.models.presets import QwenConfig
from megatron_qwen.platform import distributed
from megatron_qwen.training import optimizer as optimizer_state
from megatron_qwen.training import rng, state_check

TRAINER_STATE = "trainer_state.json"
OPTIMIZER_KEY = "optimizer"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, or does not fit the configured model."""


@dataclasses.dataclass
class StartPoint:
    """Where the run's weights come from: ``kind`` is ``"resume"``, ``"pretrained"`` or ``"random"``."""

    kind: str
    iteration_dir: Path | None = None
    flag: str | None = None  # the flag that named it, for error messages

    def describe(self) -> str:
        return "random weights" if self.iteration_dir is None else f"{self.kind} from {self.iteration_dir}"


def start_point(save_dir: str | None, pretrained: str | None) -> StartPoint:
    """The checkpoint a run starts from (module docstring); missing or incomplete ones raise ``CheckpointError``,
    as does a ``--save-dir`` whose iterations no readable ``latest`` names (a start from scratch would overwrite
    them)."""
    if save_dir is not None and (layout.list_iterations(save_dir) or (Path(save_dir) / layout.LATEST).exists()):
        return StartPoint("resume", _resolve(save_dir, "--save-dir"), "--save-dir")
    if pretrained is not None:
        return StartPoint("pretrained", _resolve(pretrained, "--pretrained-checkpoint"), "--pretrained-checkpoint")
    return StartPoint("random")


def verify(start: StartPoint, skip: bool) -> str | None:
    """Checks the files of the iteration the run starts from against its manifest (collective, a share per rank);
    returns a warning for an iteration that cannot be verified (written before manifests, or ``skip``)."""
    if start.iteration_dir is None:
        return None
    if skip:
        return f"{start.iteration_dir}: its files were not verified (--skip-verify)"
    try:
        return manifest.verify_on_all_ranks(start.iteration_dir)
    except manifest.ManifestError as error:
        raise CheckpointError(f"{start.flag}: {error} (--skip-verify starts from it anyway)") from None


def check_finite(ddp_chunks: list, optimizer, start: StartPoint) -> None:
    """Refuses a loaded state with a NaN or Inf in a weight or (``optimizer``) its state (``state_check``)."""
    found = state_check.first_non_finite(ddp_chunks, optimizer)
    _collective_check(found and f"{start.flag}: {start.iteration_dir}: non-finite values (NaN or Inf) in {found} "
                                f"(rank {distributed.rank_and_size()[0]}); resume from an earlier iteration")


def _resolve(root: str, flag: str) -> Path:
    try:
        return layout.resolve_iteration(root)
    except (FileNotFoundError, ValueError) as error:
        raise CheckpointError(f"{flag} {root}: {error}") from error


def model_config(start: StartPoint, preset: QwenConfig | None) -> QwenConfig:
    """The model to build: the checkpoint's, which must equal ``--preset`` when both are given."""
    if start.iteration_dir is None:
        if preset is None:
            raise CheckpointError("no --preset and no checkpoint to read the model configuration from")
        return preset
    try:
        saved = layout.load_config(start.iteration_dir)
    except (OSError, ValueError, TypeError) as error:
        raise CheckpointError(f"{start.flag}: {start.iteration_dir}: unreadable model configuration ({error})") from error
    if preset is not None:
        differing = [
            f"{field.name}: checkpoint {getattr(saved, field.name)!r}, --preset {getattr(preset, field.name)!r}"
            for field in dataclasses.fields(QwenConfig)
            if field.name != "name" and getattr(saved, field.name) != getattr(preset, field.name)
        ]
        if differing:
            raise CheckpointError(
                f"{start.flag}: {start.iteration_dir} holds another model than --preset {preset.name} "
                f"({'; '.join(differing)})"
            )
    return saved


def model_sharded_state_dict(ddp_chunks: list) -> dict:
    """The model's checkpoint entries, one sub-dict per model chunk (local keys repeat across chunks; the
    checkpoint names inside are global, so any layout reads them)."""
    return {f"model{index}": chunk.module.sharded_state_dict() for index, chunk in enumerate(ddp_chunks)}


def _load_model_entries(ddp_chunks: list, loaded: dict, requested: dict) -> None:
    for index, chunk in enumerate(ddp_chunks):
        name = f"model{index}"
        chunk.module.load_state_dict({key: loaded[name][key] for key in requested[name]})


def _collective_check(problem: str | None) -> None:
    """Raises ``CheckpointError`` on every rank when any rank found a problem (a raise on some ranks only
    would leave the others waiting in the next collective)."""
    found = [found for found in distributed.all_gathered(problem) if found]
    if found:
        raise CheckpointError(found[0])


def check_shapes(requested: dict, iteration_dir: Path, flag: str) -> None:
    """Every weight this rank needs is in the checkpoint, at the global shape the configured model has."""
    problem = None
    try:
        saved = dist_checkpointing.load_tensors_metadata(str(iteration_dir))
    except Exception as error:  # noqa: BLE001 - any failure to read the metadata is the same message
        damaged = layout.damaged_file(iteration_dir)
        problem = f"{flag}: {damaged or f'{iteration_dir} is unreadable ({type(error).__name__}: {error})'}"
        saved = {}
    for tensor in ([] if problem else _sharded_tensors(requested)):
        if tensor.key not in saved:
            problem = f"{flag}: {iteration_dir} has no weight {tensor.key!r} that the configured model needs"
            break
        if tuple(saved[tensor.key].global_shape) != tuple(tensor.global_shape):
            problem = (
                f"{flag}: {iteration_dir}: {tensor.key} has shape {tuple(saved[tensor.key].global_shape)} in the "
                f"checkpoint but {tuple(tensor.global_shape)} in the configured model"
            )
            break
    _collective_check(problem)


def _sharded_tensors(sharded: dict):
    for value in nested_values(sharded):
        if isinstance(value, ShardedTensorFactory):
            yield from _sharded_tensors(value.build())
        elif isinstance(value, ShardedTensor):
            yield value


def _load(requested: dict, iteration_dir: Path, flag: str) -> dict:
    problem, loaded = None, None
    try:
        loaded = dist_checkpointing.load(requested, str(iteration_dir))
    except (Exception, CheckpointException) as error:  # noqa: BLE001 - all mean "cannot use this checkpoint"
        # (torch's CheckpointException, which carries every rank's failure, derives from BaseException)
        cause = _root_cause(error)
        damaged = layout.damaged_file(iteration_dir)
        problem = f"{flag}: {damaged or f'{iteration_dir} could not be loaded ({type(cause).__name__}: {cause})'}"
    _collective_check(problem)
    return loaded


def _root_cause(error: BaseException) -> BaseException:
    """The first rank's own exception inside torch's CheckpointException (whose text is every traceback)."""
    if isinstance(error, CheckpointException) and error.failures:
        failure = next(iter(error.failures.values()))  # (exception, traceback summary)
        return failure[0] if isinstance(failure, tuple) else failure
    return error


def load_pretrained(ddp_chunks: list, start: StartPoint) -> None:
    """Weights only (finetune semantics). Call it before the optimizer is built, which copies the weights
    into its float32 main parameters."""
    requested = model_sharded_state_dict(ddp_chunks)
    check_shapes(requested, start.iteration_dir, start.flag)
    loaded = _load(requested, start.iteration_dir, start.flag)
    _load_model_entries(ddp_chunks, loaded, requested)
    check_finite(ddp_chunks, None, start)


TRAINER_STATE_KEYS = ("iteration", "layout", "scheduler", "data")  # what a resume reads of it


def read_trainer_state(iteration_dir: Path) -> dict:
    """``trainer_state.json`` of ``iteration_dir``, checked to hold every entry a resume restores and the iteration
    the folder is named after."""
    path = iteration_dir / TRAINER_STATE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(
            f"{path}: unreadable ({error}); a trainer checkpoint holds it (to start from converter output, "
            "use --pretrained-checkpoint with an empty --save-dir)"
        ) from error
    missing = [key for key in TRAINER_STATE_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise CheckpointError(f"{path}: has no {', '.join(missing)}; it was edited or not written by the trainer")
    iteration = state["iteration"]
    if not isinstance(iteration, int) or layout.iteration_name(iteration) != iteration_dir.name:
        raise CheckpointError(f"{path}: iteration {iteration!r} disagrees with its folder {iteration_dir.name}")
    return state


def saved_layout(layout_saved: dict) -> dict:
    """The layout an iteration records, with what iterations written before expert parallelism leave out: they ran
    without it (EP 1, experts' TP the TP size)."""
    return {"expert_parallel": 1, "expert_tensor_parallel": layout_saved.get("tensor_parallel"), **layout_saved}


def load_resume(ddp_chunks: list, optimizer, start: StartPoint, layout_now: dict) -> tuple[dict, str]:
    """Model, optimizer and (at the same layout, on the same kind of device) RNG states; returns the trainer state
    to restore the rest, and what became of the RNG states (for the start line)."""
    trainer_state = read_trainer_state(start.iteration_dir)
    requested = model_sharded_state_dict(ddp_chunks)
    check_shapes(requested, start.iteration_dir, start.flag)
    full_request = dict(requested)
    full_request[OPTIMIZER_KEY] = optimizer_state.sharded_state_dict(optimizer, requested, is_loading=True)
    same_layout = saved_layout(trainer_state["layout"]) == layout_now
    if same_layout:
        full_request[rng.KEY] = rng.sharded_object()
    loaded = _load(full_request, start.iteration_dir, start.flag)
    _load_model_entries(ddp_chunks, loaded, requested)
    optimizer_state.load_state_dict(optimizer, loaded[OPTIMIZER_KEY])
    check_finite(ddp_chunks, optimizer, start)
    not_restored = rng.restore(loaded[rng.KEY]) if same_layout else "saved at another layout"
    outcome = "RNG states restored" if not_restored is None else f"RNG from --seed ({not_restored})"
    return trainer_state, outcome


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """What every iteration of a run records besides its state: the model's configuration, the tokenizer's files
    and what the training data was rendered with (``chat_settings``: ``layout.chat_settings``' arguments, written
    to ``chat.json``, which the export's chat template follows; ``None`` when the datasets do not record them)."""

    model: QwenConfig
    tokenizer: object
    chat_settings: dict | None


def save(settings: CheckpointSettings, iteration: int, ddp_chunks: list, optimizer, trainer_state: dict,
         record: RunRecord) -> Path:
    """Writes iteration ``iteration`` into ``settings.save_dir`` (collective), made visible only when complete; keeps
    the last ``settings.keep_last``."""
    requested = model_sharded_state_dict(ddp_chunks)
    state = dict(requested)
    state[OPTIMIZER_KEY] = optimizer_state.sharded_state_dict(optimizer, requested)
    state[rng.KEY] = rng.sharded_object(rng.capture())
    files = {TRAINER_STATE: json.dumps(trainer_state, indent=1) + "\n"}
    if record.chat_settings is not None:
        files[layout.CHAT_SETTINGS] = layout.chat_settings(**record.chat_settings)
    return layout.save_iteration(
        settings.save_dir,
        iteration,
        state,
        model_config=record.model,
        tokenizer=record.tokenizer,
        extra_files=files,
        keep_last=settings.keep_last,
    )
