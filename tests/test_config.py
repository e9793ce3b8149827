"""The run configuration: report defaults, generated flags, recipe files, precedence and validation."""
import dataclasses
import json
import re
import typing
from pathlib import Path

import pytest

from megatron_qwen.models.presets import PRESETS
from megatron_qwen.config import RunConfig, build_parser, parse_config

BASE = ["--data-path", "data/chat", "--preset", "tiny"]


def test_defaults_are_the_qwen_report_recipe():
    config = parse_config(BASE)
    optimizer, training = config.optimizer, config.training
    assert (optimizer.adam_beta1, optimizer.adam_beta2, optimizer.adam_eps) == (0.9, 0.95, 1e-8)
    schedule = (optimizer.lr, optimizer.warmup_steps, optimizer.lr_decay_style, optimizer.min_lr)
    assert schedule == (2e-6, 1430, "constant", 0.0)
    assert (optimizer.weight_decay, optimizer.clip_grad) == (0.1, 1.0)
    assert (training.train_steps, training.global_batch_size, config.data.seq_length) == (4000, 128, 2048)
    assert (config.model.dropout, config.model.precision, config.model.fp8) == (0.1, "bf16", False)
    # the report's batches of 128 conversations, without computing their padding
    assert config.data.rows == "padfree"


def test_every_field_has_a_flag_and_each_flag_sets_its_field():
    flags = {option for action in build_parser()._actions for option in action.option_strings}
    for section in dataclasses.fields(RunConfig):
        for field in dataclasses.fields(getattr(RunConfig(), section.name)):
            assert "--" + field.name.replace("_", "-") in flags
    config = parse_config(
        BASE
        + ["--data-path", "a", "b", "--data-weights", "0.3", "0.7", "--tensor-parallel", "2", "--sequence-parallel"]
        + ["--no-distributed-optimizer", "--rows", "pack", "--lr", "1e-5", "--recompute", "selective"]
        + ["--virtual-pipeline", "none", "--pretrained-checkpoint", "ckpt/"]
    )
    assert config.data.data_path == ["a", "b"] and config.data.data_weights == [0.3, 0.7]
    assert config.parallel.tensor_parallel == 2 and config.parallel.sequence_parallel is True
    assert config.parallel.distributed_optimizer is False and config.parallel.virtual_pipeline is None
    assert (config.data.rows, config.optimizer.lr, config.model.recompute) == ("pack", 1e-5, "selective")
    assert config.checkpoint.pretrained_checkpoint == "ckpt/"


def test_recipe_file_then_command_line(tmp_path):
    recipe = tmp_path / "recipe.json"
    settings = {"lr": 1e-5, "train_steps": 50, "warmup_steps": 5, "data_path": ["r/chat"], "preset": "tiny"}
    recipe.write_text(json.dumps(settings))
    config = parse_config(["--recipe", str(recipe), "--train-steps", "60"])
    assert (config.optimizer.lr, config.training.train_steps, config.optimizer.warmup_steps) == (1e-5, 60, 5)
    assert config.data.data_path == ["r/chat"]


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"learning_rate": 1.0}, r"recipe .*recipe.json: unknown setting 'learning_rate'"),
        ({"train_steps": "many"}, r"recipe .*recipe.json: train_steps: expected int, got 'many'"),
        ({"train_steps": 2.5}, r"recipe .*recipe.json: train_steps: expected int, got 2.5"),
        ({"rows": "stack"}, r"recipe .*recipe.json: rows: expected one of \('pad', 'pack', 'padfree'\), got 'stack'"),
        ({"data_path": "one"}, r"recipe .*recipe.json: data_path: expected a list"),
        ({"sequence_parallel": "yes"}, r"recipe .*recipe.json: sequence_parallel: expected true or false"),
    ],
)
def test_bad_recipe_values_name_the_file_and_setting(tmp_path, settings, message):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps(settings))
    with pytest.raises(ValueError, match=message):
        parse_config(BASE + ["--recipe", str(recipe)])


def test_a_shipped_recipe_is_found_by_name_from_any_folder(tmp_path, monkeypatch):
    shipped = Path(__file__).parents[1] / "megatron_qwen" / "recipes" / "qwen_14b_sft.json"
    monkeypatch.chdir(tmp_path)
    by_name = parse_config(["--recipe", "qwen_14b_sft", "--data-path", "d"])
    assert by_name == parse_config(["--recipe", str(shipped), "--data-path", "d"])
    assert by_name.model.preset == json.loads(shipped.read_text())["preset"]
    with pytest.raises(ValueError, match=r"--recipe no_such: no such file, nor a shipped recipe \(.*qwen_14b_sft"):
        parse_config(["--recipe", "no_such"])


def test_unreadable_recipe_is_named(tmp_path):
    recipe = tmp_path / "broken.json"
    recipe.write_text("{not json")
    with pytest.raises(ValueError, match=r"recipe .*broken.json: unreadable"):
        parse_config(["--recipe", str(recipe)])


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--lr", "fast"], "--lr: expected float, got 'fast'"),
        (["--micro-batch-size", "0"], "--micro-batch-size: must be at least 1, got 0"),
        (["--rows", "pad", "--global-batch-size", "10", "--micro-batch-size", "4"], "--global-batch-size: 10 is not"),
        (["--sequence-parallel"], "--sequence-parallel: needs --tensor-parallel above 1"),
        (["--virtual-pipeline", "2"], "--virtual-pipeline: needs --pipeline-parallel above 1"),
        (["--preset", "qwen-15b"], "--preset: unknown preset 'qwen-15b'"),
        (["--data-weights", "1", "2"], r"--data-weights: 2 weight\(s\) for 1 dataset\(s\)"),
        (["--warmup-steps", "4000"], r"--warmup-steps: must be below --train-steps 4000"),
        (["--warmup-steps", "-1", "--train-epochs", "2"], r"--warmup-steps: must be at least 0, got -1"),
        (["--train-epochs", "0"], r"--train-epochs: must be above 0, got 0.0"),
        (["--warmup-fraction", "1"], r"--warmup-fraction: must be in \[0, 1\), got 1.0"),
        (["--save-interval-minutes", "-5"], r"--save-interval-minutes: must be above 0, got -5.0"),
        (["--dropout", "1.0"], r"--dropout: must be in \[0, 1\)"),
        (["--min-lr", "1e-5"], r"--min-lr: above --lr 2e-06"),
        (["--valid-fraction", "1"], r"--valid-fraction: must be in \[0, 1\)"),
        (["--distributed-timeout-minutes", "0"], r"--distributed-timeout-minutes: must be above 0, got 0.0"),
        (["--eval-conversations", "0"], r"--eval-conversations: must be at least 1, got 0"),
    ],
)
def test_inconsistent_flags_name_the_flag(flags, message):
    with pytest.raises(ValueError, match=message):
        parse_config(BASE + flags)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--train-epochs", "inf"], r"--train-epochs: must be finite and above 0, got inf"),
        (["--pad-token-id", "-5"], r"--pad-token-id: must be at least 0, got -5"),
        (["--clip-grad", "-1"], r"--clip-grad: must be at least 0, got -1.0"),
        (["--save-interval-minutes", "nan"], r"--save-interval-minutes: must be finite and above 0, got nan"),
        (["--save-interval-minutes", "inf"], r"--save-interval-minutes: must be finite and above 0, got inf"),
        (["--eval-interval", "-1"], r"--eval-interval: must be at least 0, got -1"),
        (["--data-path", "a", "b", "--data-weights", "nan", "1"], r"--data-weights: must be finite and at least 0"),
        (["--data-path", "a", "b", "--data-weights", "1", "inf"], r"--data-weights: must be finite and at least 0"),
        (["--data-path", "a", "b", "--data-weights", "-1", "2"], r"--data-weights: must be at least 0, got -1.0"),
        (["--data-path", "a", "b", "--data-weights", "0", "0"], r"--data-weights: all zero"),
        (["--lr", "nan"], r"--lr: must be finite and at least 0, got nan"),
        (["--adam-beta2", "1"], r"--adam-beta2: must be in \[0, 1\), got 1.0"),
        (["--adam-eps", "0"], r"--adam-eps: must be above 0, got 0.0"),
        (["--weight-decay", "-0.1"], r"--weight-decay: must be at least 0, got -0.1"),
        (["--seed", "-1"], r"--seed: must be in \[0, 4294967296\), got -1"),
        (["--distributed-timeout-minutes", "inf"], r"--distributed-timeout-minutes: must be finite and above 0"),
        (["--dropout", "nan"], r"--dropout: must be finite and in \[0, 1\), got nan"),
        (["--pipeline-parallel", "0"], r"--pipeline-parallel: must be at least 1, got 0"),
        (["--virtual-pipeline", "0", "--pipeline-parallel", "2"], r"--virtual-pipeline: must be at least 1, got 0"),
    ],
)
def test_values_out_of_their_range_name_the_flag(flags, message):
    with pytest.raises(ValueError, match=message):
        parse_config(BASE + flags)


def test_every_numeric_setting_has_a_range():
    numeric = set()
    for section in typing.get_type_hints(RunConfig).values():
        hints = typing.get_type_hints(section)
        for field in dataclasses.fields(section):
            kind = hints[field.name]
            if kind in (int, float) or re.search(r"\b(int|float)\b", repr(kind)):  # Optional[...], list[...]
                numeric.add(field.name)
                assert field.metadata["bounds"] is not None, f"{field.name} has no range"
    assert {"seq_length", "clip_grad", "data_weights", "eval_conversations", "train_epochs"} <= numeric


def test_a_range_also_applies_to_recipe_values(tmp_path):
    recipe = tmp_path / "recipe.json"
    recipe.write_text(json.dumps({"clip_grad": -1.0}))
    with pytest.raises(ValueError, match=r"--clip-grad: must be at least 0, got -1.0"):
        parse_config(BASE + ["--recipe", str(recipe)])


def test_output_folders_that_are_files_are_refused(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ValueError, match=rf"--save-dir: {afile} is a file, not a folder"):
        parse_config(BASE + ["--save-dir", str(afile)])
    with pytest.raises(ValueError, match=rf"--tensorboard-dir: {afile} is a file, not a folder"):
        parse_config(BASE + ["--tensorboard-dir", str(afile / "runs")])
    assert parse_config(BASE + ["--save-dir", str(tmp_path / "new" / "save")]).checkpoint.save_dir


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--seq-length", "40000"], r"--seq-length: 40000 is above the 2048 positions of tiny"),
        (["--pipeline-parallel", "3"], r"--pipeline-parallel: the 4 layers of tiny do not split evenly into 3 stages"),
        (["--pipeline-parallel", "2", "--virtual-pipeline", "4"],
         r"--pipeline-parallel: the 4 layers of tiny do not split evenly into 8 stages \(x --virtual-pipeline 4\)"),
        (["--tensor-parallel", "3"], r"--tensor-parallel: tiny's 4 num attention heads do not split evenly over 3"),
        (["--tensor-parallel", "4"], r"--tensor-parallel: tiny's 2 num query groups do not split evenly over 4"),
    ],
)
def test_a_run_that_does_not_fit_the_model_names_the_flag(flags, message):
    config = parse_config(BASE + flags)
    with pytest.raises(ValueError, match=message):
        config.check_model(PRESETS["tiny"])


@pytest.mark.parametrize(
    "preset,flags,message",
    [
        ("tiny", ["--expert-parallel", "2"], r"--expert-parallel: tiny has no experts"),
        ("tiny-moe", ["--expert-parallel", "3"], r"--expert-parallel: tiny-moe's 8 experts do not split evenly over 3"),
        ("tiny-moe", ["--expert-tensor-parallel", "3"],
         r"--expert-tensor-parallel: tiny-moe's experts' FFN of 32 does not split evenly over 3 ranks"),
        ("tiny-moe", ["--tensor-parallel", "2"], r"--sequence-parallel: megatron-core trains mixture-of-experts"),
        ("tiny", ["--moe-aux-loss-coeff", "0.01"], r"--moe-aux-loss-coeff: tiny has no experts"),
        ("tiny-moe", ["--pipeline-parallel", "2"], r"--pipeline-parallel: stage 1 of 2 would hold none of tiny-moe's"),
        ("tiny", ["--moe-z-loss-coeff", "0.001"], r"--moe-z-loss-coeff: tiny has no experts"),
        ("tiny", ["--moe-token-dispatcher-type", "alltoall"], r"--moe-token-dispatcher-type: tiny has no experts"),
    ],
)
def test_an_expert_layout_that_does_not_fit_the_model_names_the_flag(preset, flags, message):
    config = parse_config(BASE + flags)
    with pytest.raises(ValueError, match=message):
        config.check_model(PRESETS[preset])


def test_expert_parallel_world_sizes():
    config = parse_config(BASE + ["--tensor-parallel", "2", "--sequence-parallel", "--expert-parallel", "2"])
    config.check_model(PRESETS["tiny-moe"])
    assert config.data_parallel_size(4) == 2  # expert-TP defaults to TP: 2 x EP 2 fills 4 ranks
    with pytest.raises(ValueError, match=r"--expert-parallel 2: world size 2 is not a multiple of expert-TP x EP"):
        config.data_parallel_size(2)
    config.parallel.expert_tensor_parallel = 1
    assert config.data_parallel_size(2) == 1


def test_a_run_that_fits_the_model_passes():
    parse_config(BASE + ["--seq-length", "2048", "--pipeline-parallel", "2", "--tensor-parallel", "2"]).check_model(
        PRESETS["tiny"]
    )


def test_missing_model_source_and_data_are_refused():
    with pytest.raises(ValueError, match="--preset: no preset and no checkpoint"):
        parse_config(["--data-path", "x"])
    assert parse_config(["--data-path", "x", "--pretrained-checkpoint", "c"]).model.preset is None
    with pytest.raises(ValueError, match="--data-path: no dataset given"):
        parse_config(["--preset", "tiny"])


def test_micro_batches_per_update():
    layout = ["--tensor-parallel", "2", "--pipeline-parallel", "2", "--micro-batch-size", "2"]
    padfree = parse_config(BASE + layout + ["--global-batch-size", "13"])  # conversations: any count
    assert padfree.num_micro_batches(world_size=8) is None  # as many as each update's packed rows need
    assert padfree.row_multiple(world_size=8) == 4  # DP 2 x micro-batch 2
    padfree.parallel.virtual_pipeline = 2
    assert padfree.row_multiple(world_size=8) == 8  # the interleaved schedule: whole groups of PP micro-batches
    config = parse_config(BASE + layout + ["--rows", "pad"])
    assert config.num_micro_batches(world_size=8) == 32  # DP 2: 128 / (2 * 2)
    with pytest.raises(ValueError, match="world size 6 is not a multiple of TP x PP = 4"):
        config.num_micro_batches(world_size=6)
    config.training.global_batch_size = 12
    with pytest.raises(ValueError, match="--global-batch-size 12 is not a multiple of data-parallel size 4"):
        config.num_micro_batches(world_size=16)


def test_megatron_spellings_set_our_settings():
    megatron = parse_config(BASE + [
        "--tensor-model-parallel-size", "2", "--pipeline-model-parallel-size", "2", "--train-iters", "30",
        "--lr-warmup-iters", "3", "--bf16", "--use-distributed-optimizer", "--recompute-granularity", "selective",
        "--hidden-dropout", "0.0", "--attention-dropout", "0", "--save", "out", "--override-opt_param-scheduler",
        "--expert-model-parallel-size", "4", "--expert-tensor-parallel-size", "1",
    ])
    ours = parse_config(BASE + [
        "--tensor-parallel", "2", "--pipeline-parallel", "2", "--train-steps", "30", "--warmup-steps", "3",
        "--precision", "bf16", "--distributed-optimizer", "--recompute", "selective", "--dropout", "0",
        "--save-dir", "out", "--override-schedule", "--expert-parallel", "4", "--expert-tensor-parallel", "1",
    ])
    assert megatron == ours and ours.model.dropout == 0.0 and ours.training.train_steps == 30
    assert (ours.parallel.expert_parallel, ours.parallel.expert_tensor_parallel) == (4, 1)
    fraction = parse_config(BASE + ["--lr-warmup-fraction", "0.25"]).optimizer.warmup_fraction
    assert fraction == 0.25


def test_megatron_load_resumes_from_the_save_dir_or_starts_from_other_weights(tmp_path):
    same = parse_config(BASE + ["--save", str(tmp_path / "run"), "--load", f"{tmp_path}/./run"]).checkpoint
    assert (same.save_dir, same.pretrained_checkpoint) == (str(tmp_path / "run"), None)
    other = parse_config(BASE + ["--save", str(tmp_path / "run"), "--load", "converted"]).checkpoint
    assert other.pretrained_checkpoint == "converted"
    with pytest.raises(ValueError, match=r"^--load converted: neither the save directory nor --pretrained-checkpoint"):
        parse_config(BASE + ["--load", "converted", "--pretrained-checkpoint", "elsewhere"])


def test_megatron_weighted_data_path_gives_prefixes_and_weights():
    config = parse_config(["--preset", "tiny", "--data-path", "0.3", "data/chat", "0.7", "data/code"])
    assert (config.data.data_path, config.data.data_weights) == (["data/chat", "data/code"], [0.3, 0.7])
    with pytest.raises(ValueError, match=r"^--data-path: weighted .* and --data-weights given"):
        parse_config(["--preset", "tiny", "--data-path", "1", "a", "--data-weights", "1"])


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--hidden-dropout", "0.1", "--attention-dropout", "0.2"],
         r"^--attention-dropout 0.2 and --hidden-dropout 0.1: both set --dropout \(one dropout here"),
        (["--tensor-parallel", "2", "--tensor-model-parallel-size", "4"],
         r"^--tensor-model-parallel-size 4 and --tensor-parallel 2: both set --tensor-parallel$"),
        (["--train-step", "4"], r"^--train-step: unknown flag; did you mean --train-steps\?$"),  # no abbreviations
        (["--save", "a", "--save-d", "b"], r"^--save-d: unknown flag; did you mean --save-dir\?$"),
        (["--tensor-model-paralel-size", "2"],
         r"^--tensor-model-paralel-size: unknown flag; did you mean --tensor-model-parallel-size\?$"),
        (["--lr", "1e-5", "2e-5"], r"^'2e-5': a value that no flag takes$"),
    ],
)
def test_conflicting_aliases_abbreviations_and_unknown_flags_are_refused(flags, message):
    with pytest.raises(ValueError, match=message):
        parse_config(BASE + flags)


def test_help_names_the_module_and_says_each_default_once():
    text = build_parser().format_help()
    assert text.startswith("usage: python -m megatron_qwen.train ")
    flat = " ".join(text.split())
    assert "default: by size (at least 0)" in flat and "default: read from the pretrained checkpoint --" in flat
    assert "--hidden-dropout" in text and "--train-iters" in text
