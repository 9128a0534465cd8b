"""The names a deployment answers to, shared by the HTTP and gRPC front ends.

As in vLLM: the served name is the `--model` value exactly as given, unless
`--served-model-name` gives one or more names instead. Responses carry the
first; `/v1/models` lists them all; a request naming any other model gets
`ModelNotFound` (404 / NOT_FOUND), and a request naming none is served.
"""
from __future__ import annotations

from dataclasses import dataclass

from pdserve.router.errors import ModelNotFound


@dataclass(frozen=True)
class ServedModels:
    names: tuple[str, ...]

    def __post_init__(self) -> None:
        if not self.names or any(not name for name in self.names):
            raise ValueError(f"served model names must be one or more non-empty strings, got {self.names!r}")

    @property
    def primary(self) -> str:
        """The name responses carry in `model`."""
        return self.names[0]

    def check(self, requested: str | None) -> None:
        """Refuse a request naming a model this server does not serve (none named: the served one)."""
        if requested and requested not in self.names:
            served = ", ".join(f"`{name}`" for name in self.names)
            raise ModelNotFound(f"The model `{requested}` does not exist; this server serves {served}.")
