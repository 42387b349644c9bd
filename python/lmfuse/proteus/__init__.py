"""PROTEUS: automated proteomics discovery — data readers, analysis tools, planning (rules, an
LLM, or both), execution with refinement, grounded hypotheses, reports and evaluation. Works
offline by default.

Names are imported from their submodules on first use, so ``import lmfuse.proteus`` stays light.
"""

import importlib

# public name -> submodule of lmfuse.proteus that defines it
_EXPORTS: dict[str, str] = {
    # data, tools, synthetic cohorts
    "Column": "data", "DataProfile": "data", "DataError": "data", "ProteomicsDataset": "data",
    "load": "data", "read_maxquant": "data", "read_diann": "data", "read_wide_table": "data",
    "read_metadata": "data", "infer_roles": "data",
    "Finding": "tools", "ToolContext": "tools", "ToolResult": "tools", "ToolSpec": "tools",
    "run_tool": "tools", "list_tools": "tools", "get_tool": "tools", "narrowed_schema": "tools",
    "openai_tools": "tools", "action_schema": "tools", "affordances": "tools",
    "read_gmt": "stats", "write_gmt": "stats",
    "SynthSpec": "synth", "SynthTruth": "synth", "SynthCohort": "synth", "make_cohort": "synth",
    "make_null_cohort": "synth",
    # planning, execution, hypotheses, output, evaluation
    "run": "run", "replay": "run", "RunResult": "run",
    "Engine": "engine", "StepRecord": "engine",
    "RuleBasedPlanner": "planner", "LLMPlanner": "planner", "HybridPlanner": "planner",
    "Objective": "planner", "Action": "planner",
    "OpenAICompatBackend": "llm", "ReplayBackend": "llm", "LocalHFBackend": "llm", "LLMError": "llm",
    "Hypothesis": "hypotheses", "Claim": "hypotheses",
    "score": "evaluate", "seed_table": "evaluate", "judge": "evaluate", "check_judge": "evaluate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
