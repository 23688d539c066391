"""Tensor-by-tensor I/O of sharded safetensors checkpoints (spec/merging.md §1.2, §5.1 items 1 and 5).

* :class:`CheckpointReader` reads ``model.safetensors`` or the shards listed by ``model.safetensors.index.json``.
  Headers are parsed once; a tensor is read with positional reads (``os.preadv``) straight into a fresh tensor.
  Unlike ``safe_open`` (a memory map) this leaves no file pages mapped into the process, so the resident set is
  the working set only — the whole point of streaming — and a merge's peak RSS does not grow with shard size.
  (``tests/test_fusion.py`` checks it reads exactly what ``safe_open`` reads.)
* :class:`ShardedWriter` knows every output tensor's name, shape and dtype before any arithmetic, so it writes each
  shard's header first and then the raw bytes of each tensor at its offset: memory is one tensor, never a shard
  (mergekit and ``save_file`` hold a whole shard). It writes HF shard names ``model-0000i-of-0000N.safetensors``
  (one shard: ``model.safetensors``) and ``model.safetensors.index.json`` (``metadata.total_size``,
  ``weight_map``), into a temporary sibling directory renamed into place at the end (nothing half-written is
  ever left under the final name).
* :func:`copy_model_files` copies ``config.json``, ``generation_config.json`` and the tokenizer files.

Format (safetensors spec): 8-byte little-endian header length ``N``, ``N`` bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``, then the data;
offsets are relative to the data start and tile it without gaps.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Iterable, Mapping

import torch

from .layout import TensorMeta

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MODEL_FILES = (
    "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)
ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
_MAX_IO = 1 << 30  # bytes per preadv/pwrite call


def _read_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        header = json.loads(f.read(n))
    return header, 8 + n


class CheckpointReader:
    """Lazy reader of one checkpoint (a directory with safetensors shards, or one ``.safetensors`` file).

    ``meta`` maps each tensor name to :class:`TensorMeta`, in file order (shard, then offset)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        files = self._shard_files()
        self._where: dict[str, tuple[Path, int, int]] = {}
        self.meta: dict[str, TensorMeta] = {}
        self.metadata: dict[str, str] = {}
        for file in files:
            header, data_start = _read_header(file)
            self.metadata.update(header.pop("__metadata__", None) or {})
            for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                if info["dtype"] not in ST_DTYPES:
                    raise ValueError(f"{file}: tensor {name} has unsupported dtype {info['dtype']}")
                begin, end = info["data_offsets"]
                self._where[name] = (file, data_start + begin, end - begin)
                self.meta[name] = TensorMeta(name, tuple(info["shape"]), ST_DTYPES[info["dtype"]])
        self._fds: dict[Path, int] = {}

    def _shard_files(self) -> list[Path]:
        if self.path.is_file():
            return [self.path]
        index = self.path / INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return [self.path / f for f in sorted(set(weight_map.values()))]  # shard order, as written
        single = self.path / SINGLE_NAME
        if single.is_file():
            return [single]
        raise FileNotFoundError(f"{self.path}: no {SINGLE_NAME} or {INDEX_NAME} (safetensors checkpoints only; "
                                f"convert .bin checkpoints once with save_pretrained(safe_serialization=True))")

    def keys(self) -> list[str]:
        return list(self.meta)

    def nbytes(self, name: str) -> int:
        return self._where[name][2]

    def read(self, name: str) -> torch.Tensor:
        """A fresh CPU tensor holding ``name`` in its stored dtype."""
        if name not in self._where:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        file, offset, size = self._where[name]
        meta = self.meta[name]
        buf = torch.empty(size, dtype=torch.uint8)
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = os.open(file, os.O_RDONLY)
        view = memoryview(buf.numpy())
        done = 0
        while done < size:
            n = os.preadv(fd, [view[done:done + _MAX_IO]], offset + done)
            if n <= 0:
                raise IOError(f"{file}: unexpected end of file reading {name}")
            done += n
        return buf.view(meta.dtype).reshape(meta.shape)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def plan_shards(metas: Iterable[TensorMeta], max_shard_size: int) -> list[list[TensorMeta]]:
    """Greedy shards in the given order, each at most ``max_shard_size`` bytes of data (a larger tensor alone)."""
    if max_shard_size < 1:
        raise ValueError(f"max_shard_size must be >= 1 byte, got {max_shard_size}")
    shards: list[list[TensorMeta]] = [[]]
    size = 0
    for meta in metas:
        if shards[-1] and size + meta.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(meta)
        size += meta.nbytes
    return shards


def _header_bytes(metas: list[TensorMeta], metadata: Mapping[str, str]) -> tuple[bytes, dict[str, tuple[int, int]]]:
    header: dict = {"__metadata__": dict(metadata)}
    offsets = {}
    pos = 0
    for m in metas:
        offsets[m.name] = (pos, pos + m.nbytes)
        header[m.name] = {"dtype": ST_NAMES[m.dtype], "shape": list(m.shape), "data_offsets": [pos, pos + m.nbytes]}
        pos += m.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw, offsets


class ShardedWriter:
    """Streams tensors into pre-planned safetensors shards under ``out_dir`` (see the module docstring).

    ``write`` takes tensors in any order; ``close`` checks that every planned tensor was written, writes the
    index and renames the temporary directory to ``out_dir``. ``abort`` removes the temporary directory."""

    def __init__(self, out_dir: str | Path, metas: Iterable[TensorMeta], max_shard_size: int,
                 metadata: Mapping[str, str] | None = None, overwrite: bool = False):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and not overwrite:
            raise FileExistsError(f"{self.out_dir} exists; pass overwrite=True to replace it")
        self.tmp_dir = self.out_dir.with_name(f".{self.out_dir.name}.partial-{os.getpid()}")
        if self.tmp_dir.exists():
            shutil.rmtree(self.tmp_dir)
        self.tmp_dir.mkdir(parents=True)
        metadata = {"format": "pt", **(metadata or {})}
        shards = plan_shards(metas, max_shard_size)
        n = len(shards)
        self.files = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._slot: dict[str, tuple[int, int, TensorMeta]] = {}
        self._fds: list[int] = []
        self.total_size = 0
        for file, shard in zip(self.files, shards):
            head, offsets = _header_bytes(shard, metadata)
            fd = os.open(self.tmp_dir / file, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            os.pwrite(fd, head, 0)
            data_size = sum(m.nbytes for m in shard)
            os.ftruncate(fd, len(head) + data_size)
            self._fds.append(fd)
            for m in shard:
                self._slot[m.name] = (len(self._fds) - 1, len(head) + offsets[m.name][0], m)
            self.total_size += data_size
        self.weight_map = {name: self.files[idx] for name, (idx, _, _) in self._slot.items()}
        self._written: set[str] = set()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self._slot:
            raise KeyError(f"tensor {name!r} is not in the output plan")
        idx, offset, meta = self._slot[name]
        if tuple(tensor.shape) != tuple(meta.shape) or tensor.dtype != meta.dtype:
            raise ValueError(f"tensor {name}: planned {tuple(meta.shape)} {meta.dtype}, got {tuple(tensor.shape)} "
                             f"{tensor.dtype}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        view = memoryview(data.numpy())
        done = 0
        while done < len(view):
            done += os.pwrite(self._fds[idx], view[done:done + _MAX_IO], offset + done)
        self._written.add(name)

    def _close_files(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def close(self) -> Path:
        missing = set(self._slot) - self._written
        self._close_files()
        if missing:
            self.abort()
            raise RuntimeError(f"{len(missing)} planned tensor(s) were never written, e.g. {sorted(missing)[:3]}")
        if len(self.files) > 1:
            index = {"metadata": {"total_size": self.total_size}, "weight_map": dict(sorted(self.weight_map.items()))}
            (self.tmp_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return self.finish()

    def finish(self) -> Path:
        """Rename the temporary directory into place (replacing an existing ``out_dir``)."""
        if self.out_dir.exists():
            trash = self.out_dir.with_name(f".{self.out_dir.name}.old-{os.getpid()}")
            os.replace(self.out_dir, trash)
            os.replace(self.tmp_dir, self.out_dir)
            shutil.rmtree(trash)
        else:
            os.replace(self.tmp_dir, self.out_dir)
        return self.out_dir

    def abort(self) -> None:
        self._close_files()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)


def copy_model_files(src_dir: str | Path, dst_dir: str | Path) -> list[str]:
    """Copy config, generation config and tokenizer files that exist in ``src_dir``; returns their names."""
    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    copied = []
    if src_dir.is_dir():
        for name in MODEL_FILES:
            if (src_dir / name).is_file():
                shutil.copy2(src_dir / name, dst_dir / name)
                copied.append(name)
    return copied
