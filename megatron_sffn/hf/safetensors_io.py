"""Sharded safetensors weights as transformers writes and reads them.

One file ``model.safetensors`` below the shard size limit; above it
``model-00001-of-0000N.safetensors`` ... plus ``model.safetensors.index.json``
mapping each tensor to its file.  Writing streams: a shard is written as soon
as it is full, so peak memory is the model plus one shard.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Iterable

import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # transformers' own default ("5GB")


def _shard_name(index: int, total: int) -> str:
    return f"model-{index:05d}-of-{total:05d}.safetensors"


def write_sharded(
    tensors: Iterable[tuple[str, torch.Tensor]],
    out_dir: Path,
    *,
    dtype: torch.dtype,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: Callable[[str], None] = lambda message: None,
) -> list[Path]:
    """Write ``tensors`` (cast to ``dtype``) into ``out_dir`` in shards of at most ``max_shard_bytes``.

    A tensor larger than the limit gets a shard of its own.  Returns the files written.
    """
    from safetensors.torch import save_file

    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes={max_shard_bytes} must be positive")
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = 0
    written: list[tuple[Path, list[str]]] = []
    total_bytes = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        path = out_dir / f".shard-{len(written) + 1:05d}.safetensors"
        save_file(pending, str(path), metadata={"format": "pt"})
        written.append((path, list(pending)))
        progress(f"wrote shard {len(written)} ({pending_bytes / 2**20:.0f} MiB, {len(pending)} tensors)")
        pending, pending_bytes = {}, 0

    for name, tensor in tensors:
        if name in pending or any(name in names for _, names in written):
            raise ValueError(f"tensor {name} is produced twice")
        tensor = tensor.detach().to(device="cpu", dtype=dtype).contiguous()
        size = tensor.numel() * tensor.element_size()
        if pending and pending_bytes + size > max_shard_bytes:
            flush()
        pending[name] = tensor
        pending_bytes += size
        total_bytes += size
    if pending or not written:
        flush()
    if len(written) == 1:
        final = out_dir / SINGLE_FILE
        os.replace(written[0][0], final)
        return [final]
    weight_map, files = {}, []
    for i, (path, names) in enumerate(written, start=1):
        final = out_dir / _shard_name(i, len(written))
        os.replace(path, final)
        files.append(final)
        weight_map.update({name: final.name for name in names})
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return files + [out_dir / INDEX_FILE]


class SafetensorsWeights:
    """Read access to a transformers model directory's safetensors weights, by tensor name.

    Every shard the index names is checked to exist when the directory is
    opened, before anything is loaded.
    """

    def __init__(self, hf_dir: Path) -> None:
        self.hf_dir = hf_dir
        index = hf_dir / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ValueError(f"{index}: not a safetensors index (expected a 'weight_map' object): {exc}") from exc
            self._file_of = {name: hf_dir / file for name, file in weight_map.items()}
            missing = sorted({str(p) for p in self._file_of.values() if not p.is_file()})
            if missing:
                raise FileNotFoundError(f"{index} names shard(s) that do not exist: {', '.join(missing)}")
        elif (hf_dir / SINGLE_FILE).is_file():
            self._file_of = {name: hf_dir / SINGLE_FILE for name in self._names_in(hf_dir / SINGLE_FILE)}
        else:
            others = sorted(p.name for p in hf_dir.glob("*.bin")) or ["none"]
            raise FileNotFoundError(
                f"{hf_dir}: no {SINGLE_FILE} or {INDEX_FILE} (PyTorch .bin weights found: {', '.join(others)}); "
                f"only safetensors weights are read"
            )
        self._open: tuple[Path, object] | None = None

    @staticmethod
    def _names_in(path: Path) -> list[str]:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())

    def names(self) -> list[str]:
        return list(self._file_of)

    def file_of(self, name: str) -> Path:
        if name not in self._file_of:
            raise KeyError(f"{self.hf_dir}: the weights hold no tensor {name!r}")
        return self._file_of[name]

    def _handle(self, path: Path):
        """The open file ``path``; only one is kept open, so one shard at a time is memory-mapped.

        Tensors are read in the order they were written, so each shard is opened once.
        """
        from safetensors import safe_open

        if self._open is None or self._open[0] != path:
            self._open = None  # unmap the previous shard before mapping the next
            self._open = (path, safe_open(str(path), framework="pt"))
        return self._open[1]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(self.file_of(name)).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._handle(self.file_of(name)).get_tensor(name)
