"""Planner data types: objectives, actions (tool calls), and the planner protocol.

Planning has three levels: research *objectives* (from the data profile), a *workflow* of tool
actions per objective, and *revisions* when a quality gate asks for one. Every planner returns
the same types, and every action's arguments are validated by the tool registry before anything
runs, so an LLM planner can only choose among valid tool calls.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Protocol

OBJECTIVE_KINDS = ("group_comparison", "subtypes", "survival", "clinical_correlation")


@dataclass
class Objective:
    """A research objective: ``kind`` (one of ``OBJECTIVE_KINDS``), a title, and its parameters
    (``column``/``case``/``control`` for a comparison, ``covariate`` for a correlation)."""

    id: str
    kind: str
    title: str
    params: dict = field(default_factory=dict)
    rationale: str = ""

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Action:
    """One tool call: ``tool`` name and ``args`` dict (validated by the registry when run).
    ``uses``: names of earlier actions of the workflow whose result this one reads (``from_step``)."""

    tool: str
    args: dict
    name: str = ""
    uses: str | None = None
    purpose: str = ""

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Revision:
    """A revision a gate suggests: replace the failed action with ``action`` (``reason`` says why)."""

    reason: str
    action: Action


class Planner(Protocol):
    name: str

    def objectives(self, profile, *, gene_sets: bool) -> list[Objective]: ...

    def workflow(self, objective: Objective, profile, *, gene_sets: bool) -> list[Action]: ...

    def revise(self, objective: Objective, failed: dict, suggestions: list[Revision]) -> Revision | None: ...
