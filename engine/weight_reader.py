"""Reading tensors, or slices of them, from a directory's safetensors files.

A tensor-parallel rank reads only its rows or columns of each weight
(`safe_open(...).get_slice(name)[rows]`): the rest of the file is never copied
into memory, so N ranks of one host read the checkpoint once between them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class WeightFileError(ValueError):
    """A safetensors file that cannot be opened or read."""


class WeightReader:
    """Every tensor name of a checkpoint, and a lazy view of it; reads whole tensors or slices."""

    def __init__(self, sources: dict[str, Any], where: dict[str, str] | None = None):
        """`sources`: name -> a safetensors slice or a tensor (both index as [rows, columns])."""
        self._sources = sources
        self._where = where or {}

    @classmethod
    def open(cls, files: list[Path]) -> WeightReader:
        from safetensors import SafetensorError, safe_open

        sources, where = {}, {}
        for file in files:
            try:
                handle = safe_open(str(file), framework="pt", device="cpu")
                for name in handle.keys():
                    sources[name], where[name] = handle.get_slice(name), str(file)
            except (SafetensorError, OSError, RuntimeError) as e:
                raise WeightFileError(f"{file}: corrupt or unreadable safetensors file: {e}") from None
        return cls(sources, where)

    @classmethod
    def of_tensors(cls, tensors: dict[str, torch.Tensor]) -> WeightReader:
        """Tensors already in memory (benchmarks with random weights)."""
        return cls(dict(tensors))

    def renamed(self, names: dict[str, str]) -> WeightReader:
        """A reader of only `names` (new name -> name here), e.g. a multimodal checkpoint's text model."""
        return WeightReader({new: self._sources[old] for new, old in names.items()},
                            {new: self._where[old] for new, old in names.items() if old in self._where})

    def with_row_parts(self, parts: dict[str, tuple[str, int, int]]) -> WeightReader:
        """This reader and, besides, each new name (-> (name here, first row, end row)) as those rows of
        a tensor here: a checkpoint's fused q/k/v or gate/up read as the separate tensors it fuses."""
        sources = dict(self._sources)
        where = dict(self._where)
        for new, (old, start, stop) in parts.items():
            sources[new] = _Rows(self._sources[old], start, stop)
            if old in self._where:
                where[new] = self._where[old]
        return WeightReader(sources, where)

    def __contains__(self, name: str) -> bool:
        return name in self._sources

    def keys(self):
        return self._sources.keys()

    # Mapping-style whole-tensor reads, for readers of whole checkpoints (engine/fp8.py's layouts)
    def __getitem__(self, name: str) -> torch.Tensor:
        return self.read(name)

    def get(self, name: str, default: torch.Tensor | None = None) -> torch.Tensor | None:
        return self.read(name) if name in self._sources else default

    def shape(self, name: str) -> tuple[int, ...]:
        return _shape(self._sources[name])

    def read(self, name: str, rows: slice | None = None, columns: slice | None = None) -> torch.Tensor:
        """The tensor, or its `rows` (first axis) and `columns` (second axis) only."""
        from safetensors import SafetensorError

        source = self._sources[name]
        try:
            if rows is None and columns is None:
                return source[...]  # the whole tensor, 0-dim ones (scales) too
            rows = rows or slice(None)
            return source[rows] if columns is None else source[rows, columns]
        except (SafetensorError, OSError, RuntimeError) as e:
            raise WeightFileError(f"{self._where.get(name, 'memory')}: cannot read {name!r}: {e}") from None

    def read_experts(self, name: str, rows: slice | None = None, columns: slice | None = None) -> torch.Tensor:
        """A stacked expert tensor [experts, rows, columns], every expert's `rows` and `columns` only."""
        from safetensors import SafetensorError

        try:
            return self._sources[name][:, rows or slice(None), columns or slice(None)]
        except (SafetensorError, OSError, RuntimeError) as e:
            raise WeightFileError(f"{self._where.get(name, 'memory')}: cannot read {name!r}: {e}") from None


def _shape(source: Any) -> tuple[int, ...]:
    return tuple(source.shape) if isinstance(source, torch.Tensor) else tuple(source.get_shape())


class _Rows:
    """Rows [start, stop) of a tensor or safetensors slice, indexed as they are ([rows] or [rows, columns])."""

    def __init__(self, source: Any, start: int, stop: int):
        self._source, self._start, self._stop = source, start, stop

    def get_shape(self) -> list[int]:
        return [self._stop - self._start, *_shape(self._source)[1:]]

    def __getitem__(self, index: Any) -> torch.Tensor:
        if index is Ellipsis:
            return self._source[self._start:self._stop]
        rows, *rest = index if isinstance(index, tuple) else (index,)
        first, last, step = rows.indices(self._stop - self._start)
        assert step == 1, "row slices are contiguous"
        return self._source[(slice(self._start + first, self._start + last), *rest)]
