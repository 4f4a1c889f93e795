"""A model split for functional use: graph, trainable params (a pure dict) and the rest."""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx

from dmae_jax.exports import match_tree


@dataclasses.dataclass
class ModelParts:
    """A model split for functional use: `bind(params)` gives the module back.

    `params` is the pure nested dict of `nnx.state(model, nnx.Param)`, the form exports
    hold and training states carry; `bind` is trace-time only (no overhead under jit).
    """

    graphdef: Any
    params: dict
    rest: Any

    @classmethod
    def split(cls, model: nnx.Module) -> ModelParts:
        """Splits an NNX module into its graph, trainable params (pure dict) and the rest."""
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        return cls(graphdef, params.to_pure_dict(), rest)

    def bind(self, params: Any) -> nnx.Module:
        """The module with `params` (a pure dict, possibly of tracers) in place."""
        return nnx.merge(self.graphdef, nnx.State(params), self.rest)

    def with_params(self, params: Any, *, where: str) -> ModelParts:
        """These parts with `params` instead, checked entry by entry against the model's shapes."""
        return dataclasses.replace(self, params=match_tree(self.params, params, where=where))
