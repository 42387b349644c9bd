"""Analysis tools of lmfuse.proteus: a registry of typed, JSON-schema'd tools (see registry.py)."""

from .registry import (REGISTRY, Finding, ToolArgs, ToolContext, ToolResult, ToolSpec, action_schema, affordances, available,
                       get_tool, list_tools, narrowed_schema, openai_tools, run_tool, tool)

__all__ = ["REGISTRY", "Finding", "ToolArgs", "ToolContext", "ToolResult", "ToolSpec", "action_schema", "affordances",
           "available", "get_tool", "list_tools", "narrowed_schema", "openai_tools", "run_tool", "tool"]
