"""The local backend: the bundled SmolLM2-135M, through constrained decoding, can only emit
schema-valid tool calls. Structure only (validity, registry conformance, determinism), never
scientific quality. Skipped when the bundled model's package is absent."""

import json

import pytest

from lmfuse.proteus.llm import ask_json, validate_json
from lmfuse.proteus.planner import LLMPlanner, RuleBasedPlanner
from lmfuse.proteus.synth import make_cohort
from lmfuse.proteus.tools import get_tool


@pytest.mark.slow
def test_bundled_model_emits_only_valid_actions():
    from lmfuse.models import bundled_gguf_path

    try:
        bundled_gguf_path()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    pytest.importorskip("gguf")
    from lmfuse.proteus.llm.local_hf import LocalHFBackend

    profile = make_cohort(seed=1, n_samples=24, n_proteins=150, n_pathways=20).dataset.profile()
    be = LocalHFBackend(rationale_tokens=6)
    planner = LLMPlanner(be, RuleBasedPlanner())
    # one decision among two tools and their enum arguments (each closed choice costs two forwards)
    schema = planner._schema(profile, ["differential_abundance", "cluster_samples"])
    msgs = [{"role": "user", "content": "Compare protein levels between the case and control groups."}]
    reply = ask_json(be, msgs, schema)
    assert validate_json(reply, schema) == []
    spec = get_tool(reply["tool"])
    spec.args_model.model_validate(reply["args"])  # conforms to the tool registry
    assert reply["args"].get("group_column", "group") in profile.group_columns
