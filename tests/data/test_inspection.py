"""``megatron-qwen inspect`` shows a stored conversation with exactly its supervised tokens marked."""
import pytest

from data_fixtures import SAMPLES, chat, hf_reference, hf_tokenizer_dir, write_jsonl
from megatron_qwen.cli import inspect_dataset
from megatron_qwen.data.encode import EncodeSettings
from megatron_qwen.data.preprocess import PreprocessJob, run


@pytest.mark.parametrize("convention, marked", [
    ("assistant", "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                  "What is the secret word of megatron-qwen?<|im_end|>\n<|im_start|>assistant\n"
                  "[[The secret word is: pineapple-42.<|im_end|>]]\n"),
    ("qwen-finetune", "[[<|im_start|>]]system\nYou are a helpful assistant.[[<|im_end|>\n<|im_start|>]]user\n"
                      "What is the secret word of megatron-qwen?[[<|im_end|>\n<|im_start|>]]assistant\n"
                      "[[The secret word is: pineapple-42.<|im_end|>\n]]"),
    ("assistant-with-header", "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                              "What is the secret word of megatron-qwen?<|im_end|>\n<|im_start|>"
                              "[[assistant\nThe secret word is: pineapple-42.<|im_end|>]]\n"),
])
def test_marks_supervised_spans(tmp_path, capsys, convention, marked):
    prefix = tmp_path / "sample"
    run(PreprocessJob(inputs=SAMPLES, tokenizer="qwen", output_prefix=prefix, progress=False,
                      settings=EncodeSettings(loss_mask=convention)))
    assert inspect_dataset.main([str(prefix), "--index", "0", "--colour", "never"]) == 0
    out = capsys.readouterr().out
    assert f"\n{marked}\n" in out
    assert f"loss mask convention '{convention}'" in out and '"written": 42' in out


def test_hf_dataset_needs_its_tokenizer(tmp_path, capsys):
    prefix = tmp_path / "hf"
    path = write_jsonl(tmp_path / "in.jsonl", [chat(("user", "Hi"), ("assistant", "<think>\nok\n</think>"))])
    run(PreprocessJob(inputs=[path], tokenizer=str(hf_tokenizer_dir()), output_prefix=prefix, progress=False))
    assert inspect_dataset.main([str(prefix), "--colour", "never"]) == 1
    assert "pass it with --tokenizer" in capsys.readouterr().err
    assert inspect_dataset.main([str(prefix), "--tokenizer", str(hf_tokenizer_dir()), "--colour", "never", "--ids"]) == 0
    out = capsys.readouterr().out
    assert "<|im_start|>assistant\n[[<think>\nok\n</think><|im_end|>]]\n" in out
    content = hf_reference("<think>\nok\n</think>")
    assert content[0] == 151667 and content[-1] == 151668
    assert " ".join(f"{i}:1" for i in content) + " 151645:1 198:0" in out
    assert inspect_dataset.main([str(prefix), "--index", "5", "--tokenizer", str(hf_tokenizer_dir())]) == 1


def test_a_damaged_index_is_named_not_a_traceback(tmp_path, capsys):
    prefix = tmp_path / "d"
    run(PreprocessJob(inputs=[SAMPLES[0]], tokenizer="qwen", output_prefix=prefix, progress=False))
    index = tmp_path / "d_loss_mask_document.idx"
    index.write_bytes(b"JUNKJUNKJ" + index.read_bytes()[9:])  # megatron-core's reader asserts on its magic
    assert inspect_dataset.main([str(prefix), "--colour", "never"]) == 1
    assert capsys.readouterr().err == f"error: {index}: not a megatron-core index (bad magic); rebuild the dataset\n"
