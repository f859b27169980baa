"""Compression steps: one file per kind, each a `Step` subclass registered by kind in `STEPS`. A step is a
chain's link (`"distill -> prune:0.9 -> kmeans-4bit"`): it parses its compact token, names its variant, says
which configuration its output depends on (the cache key), whether it can run here, and runs on the previous
link's checkpoint.

Add a step kind: a new file here with a `Step` subclass (a `kind` Literal field, `claims`, `from_token`,
`label`, `compact`, `settings`, `run`) decorated `@STEPS.register("kind")`, and its import below. The
configuration (`wattflow.config`) builds the chain's step type from this registry.

This module and the step files import nothing heavy at import time (the configuration imports them): each
`run` imports the library it calls.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from wattflow.plugins import Registry

if TYPE_CHECKING:
    from wattflow.config import PipelineConfig
    from wattflow.stages import Artifact, StageResult


class Step(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Where the step may stand in a chain.
    position: ClassVar[Literal["first", "last", "any"]] = "any"

    @classmethod
    def claims(cls, name: str) -> bool:
        """Whether the compact token's name ("prune" of "prune:0.8") is this kind's."""
        raise NotImplementedError

    @classmethod
    def from_token(cls, name: str, arg: str) -> dict[str, Any]:
        """The step's fields from its compact token (name, and the text after ':')."""
        raise NotImplementedError

    def label(self) -> str:
        """Its part of the variant's name ("prune-0.8")."""
        raise NotImplementedError

    def compact(self) -> str:
        """The compact token that parses back to an equal step ("prune:0.8")."""
        raise NotImplementedError

    def settings(self, cfg: PipelineConfig) -> dict[str, Any]:
        """The configuration its output depends on, beyond its own fields (for the cache key)."""
        return {}

    def check(self, model, kept: list) -> None:
        """Raise ValueError (naming the step and the layer) when the step cannot apply to the trained model
        (`model`, freshly built; `kept`: its layers pruning never touches) — before any work starts."""

    def available(self, cfg: PipelineConfig) -> tuple[bool, str]:
        """(True, note) when it can run on this machine, and its variant on `cfg.eval.device`, else (False, why):
        the variant is then skipped."""
        return True, ""

    def uses_cuda(self) -> bool:
        """Whether `run` computes on a GPU (cuda:0): its stage's meter then covers that GPU, else none."""
        return False

    def run(self, cfg: PipelineConfig, source: StageResult, out_dir: Path, name: str
            ) -> tuple[Artifact, dict[str, Any], dict[str, float]]:
        """Apply the step to `source`'s checkpoint, writing into `out_dir`: (artifact, params, metrics)."""
        raise NotImplementedError


STEPS: Registry[type[Step]] = Registry("step kind")


def parse_step(token: str) -> dict[str, Any]:
    """A compact token ("prune:0.9", "channels:0.5", "distill", a quantize backend) as the step's fields. A name
    no kind claims is read as a quantize backend, so the error names the backends that exist."""
    name, _, arg = token.strip().partition(":")
    kind = next((k for k in STEPS.names() if STEPS.get(k).claims(name)), "quantize")
    return {"kind": kind, **STEPS.get(kind).from_token(name, arg)}


from wattflow.steps import distill, prune, quantize, sparsify  # noqa: E402,F401  (each registers itself)
