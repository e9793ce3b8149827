"""Hugging Face checkpoint files, read and written one tensor at a time.

``HFCheckpointReader`` opens a model directory holding safetensors or PyTorch ``.bin`` weights,
single-file or sharded with an ``*.index.json``, and reads tensors by name: safetensors files are
opened lazily and read per tensor; ``.bin`` files are memory-mapped, so untouched tensors stay on
disk. ``SafetensorsShardWriter`` buffers tensors up to a shard size, writes each full shard, and at
the end names the shards ``model-0000i-of-0000n.safetensors`` and writes the index.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_qwen.platform.paths import give_created_file_mode

SAFETENSORS_INDEX = "model.safetensors.index.json"
WEIGHT_LAYOUTS = (  # (index file, single file), in order of preference
    (SAFETENSORS_INDEX, "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)
_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


class HFCheckpointReader:
    """Tensors of a Hugging Face model directory, by name."""

    def __init__(self, hf_dir: str | Path):
        self.dir = Path(hf_dir)
        if not self.dir.is_dir():
            raise FileNotFoundError(f"--hf-dir {self.dir}: no such directory")
        self._open_path: Path | None = None
        self._open_file = None
        self._file_of = self._weight_map()

    def _weight_map(self) -> dict[str, Path]:
        for index_name, single_name in WEIGHT_LAYOUTS:
            index = self.dir / index_name
            if index.is_file():
                try:
                    weight_map = json.loads(index.read_text())["weight_map"]
                except (json.JSONDecodeError, KeyError) as error:
                    raise ValueError(f"{index}: not a checkpoint index with a weight_map ({error})") from None
                files = {name: self.dir / file for name, file in weight_map.items()}
                missing = sorted({str(path) for path in files.values() if not path.is_file()})
                if missing:
                    raise FileNotFoundError(f"{index} names shards that do not exist: {', '.join(missing)}")
                return files
            single = self.dir / single_name
            if single.is_file():
                return {name: single for name in self._open(single).keys()}
        expected = ", ".join(name for layout in WEIGHT_LAYOUTS for name in layout)
        raise FileNotFoundError(f"--hf-dir {self.dir}: no weights found (looked for {expected})")

    def names(self) -> list[str]:
        return list(self._file_of)

    def read(self, name: str) -> torch.Tensor:
        if name not in self._file_of:
            raise KeyError(f"{self.dir}: the checkpoint has no tensor {name!r}")
        path = self._file_of[name]
        handle = self._open(path)
        return handle.get_tensor(name) if path.suffix == ".safetensors" else handle[name]

    def read_index(self, name: str, index: int) -> torch.Tensor:
        """``read(name)[index]``, reading only that part: a slice of a safetensors file (a ``.bin`` file is
        memory-mapped, so the rest stays on disk there too)."""
        if name not in self._file_of:
            raise KeyError(f"{self.dir}: the checkpoint has no tensor {name!r}")
        path = self._file_of[name]
        handle = self._open(path)
        if path.suffix == ".safetensors":
            return handle.get_slice(name)[index]
        return handle[name][index].clone()

    def dtype(self) -> torch.dtype:
        """The dtype of the first tensor, read from the file header (safetensors) or the mapping."""
        name = next(iter(self._file_of))
        path = self._file_of[name]
        if path.suffix == ".safetensors":
            return _SAFETENSORS_DTYPES[self._open(path).get_slice(name).get_dtype()]
        return self.read(name).dtype

    def _open(self, path: Path):
        """Keeps one file open at a time: shards are read in order, so this rarely reopens one."""
        if path != self._open_path:
            self._open_file = None  # release the previous shard's mapping first
            if path.suffix == ".safetensors":
                self._open_file = safe_open(str(path), framework="pt")
            else:
                self._open_file = _TorchFile(path)
            self._open_path = path
        return self._open_file


class _TorchFile:
    """A PyTorch ``.bin`` state dict, memory-mapped, with safetensors' ``keys``/``get_tensor`` shape."""

    def __init__(self, path: Path):
        try:
            self._tensors = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as error:
            raise ValueError(f"{path}: not a readable PyTorch state dict ({error})") from None

    def keys(self):
        return self._tensors.keys()

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]


class SafetensorsShardWriter:
    """Writes tensors into safetensors shards of at most ``max_shard_bytes`` each (one tensor may exceed it)."""

    def __init__(self, out_dir: str | Path, max_shard_bytes: int = 2 * 2**30):
        self.dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in names for _, names in self._shards):
            raise ValueError(f"tensor {name!r} written twice")
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_shard_bytes:
            self._flush()
        # A copy of its own: safetensors refuses tensors that share storage (e.g. gate and up views).
        self._pending[name] = tensor.detach().contiguous().clone()
        self._pending_bytes += size
        self._total_bytes += size

    def _flush(self) -> None:
        path = self.dir / f"shard-{len(self._shards) + 1}.partial"
        save_file(self._pending, str(path), metadata={"format": "pt"})
        give_created_file_mode(path)
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> list[Path]:
        """Writes the last shard, gives every shard its final name and writes the index."""
        if self._pending:
            self._flush()
        count = len(self._shards)
        weight_map, paths = {}, []
        for number, (partial, names) in enumerate(self._shards, start=1):
            final = self.dir / f"model-{number:05d}-of-{count:05d}.safetensors"
            partial.rename(final)
            paths.append(final)
            weight_map.update({name: final.name for name in names})
        index = {"metadata": {"total_size": self._total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.dir / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return paths
