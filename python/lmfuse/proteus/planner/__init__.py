"""PROTEUS planners: :class:`RuleBasedPlanner` (default, deterministic), :class:`LLMPlanner` and
:class:`HybridPlanner` (rules propose valid candidates, a language model chooses)."""

from .base import Action, Objective, Planner, Revision
from .llm import HybridPlanner, LLMPlanner
from .rules import RuleBasedPlanner

__all__ = ["Action", "Objective", "Planner", "Revision", "RuleBasedPlanner", "LLMPlanner", "HybridPlanner"]
