"""PROTEUS hypotheses: built only from accepted evidence, re-verified by recomputation, and
never stating a number that no step produced."""

import pytest

from lmfuse.proteus.hypotheses import Claim, Hypothesis, fmt, llm_wording, numbers_in, numbers_supported, verify
from lmfuse.proteus.llm import ReplayBackend

from ._runs import planted, session_seed


def _h(**kw):
    c = Claim(subject="protein:P00001", label="IGFBP3", relation="lower_in", object="contrast:disease:cirrhosis vs healthy",
              direction="down", effect=-1.19, q=0.0123, step_ids=["S5"])
    base = dict(id="H1", objective_id="O1", kind="differential", statement="", claims=[c], entities=["IGFBP3"],
                direction="down", q=0.0123, evidence=["S5"], prediction="")
    base.update(kw)
    return Hypothesis(**base)


def test_number_extraction_ignores_identifiers():
    assert numbers_in("IGFBP3 and T2D fell by -1.19 (q 1.23e-05); C7 rose 0.98 in 12 samples") == \
        ["-1.19", "1.23e-05", "0.98", "12"]
    assert fmt(0.000123) == "1.23e-04" and fmt(-1.187) == "-1.19"


def test_invented_numbers_are_caught():
    h = _h(statement="IGFBP3 is lower in cirrhosis (log2 fold change -1.19, q 0.0123).")
    assert numbers_supported(h) == []
    assert numbers_supported(h, "IGFBP3 falls 2.5-fold in cirrhosis") == ["2.5"]
    assert numbers_supported(h, "IGFBP3 is lower (q 0.01)") == []  # a rounding of the produced q
    assert numbers_supported(h, "IGFBP3 is lower (q 0.02, 30 samples)") == ["0.02", "30"]


def test_templates_only_state_produced_numbers():
    _, res, _ = planted(session_seed())
    assert res.hypotheses
    for h in res.hypotheses:
        assert h.verified and numbers_supported(h) == [], (h.statement, numbers_supported(h))
        assert h.evidence and all(s in {r.step_id for r in res.engine.records if r.verdict == "accept"}
                                  for s in h.evidence)


def test_verification_recomputes_and_drops_claims_that_fail():
    _, res, _ = planted(session_seed())
    eng = res.engine
    h = next(x for x in res.hypotheses if x.kind == "differential")
    wrong_effect = h.claims[0].model_copy(update={"effect": h.claims[0].effect + 0.5})
    wrong_sign = h.claims[1].model_copy(update={"direction": "up" if h.claims[1].direction == "down" else "down"})
    absent = h.claims[2].model_copy(update={"subject": "protein:NOT_A_PROTEIN"})
    tampered = h.model_copy(update={"claims": [wrong_effect, wrong_sign, absent] + h.claims[3:]})
    kept = verify([tampered], eng)
    subjects = [c.subject for c in kept[0].claims]
    assert subjects == [c.subject for c in h.claims[3:]]
    assert str(len(h.claims) - 3) in kept[0].statement  # the statement was rewritten from the survivors
    only_bad = h.model_copy(update={"claims": [absent]})
    assert verify([only_bad], eng) == []


def test_llm_wording_keeps_template_when_numbers_are_invented():
    h = _h(statement="IGFBP3 is lower in cirrhosis (q 0.0123).")
    good = ReplayBackend([{"statement": "Reduced hepatic synthesis lowers IGFBP3 in cirrhosis (q 0.0123)."}])
    assert llm_wording([h], good)[0].text_source == "llm"
    bad = ReplayBackend([{"statement": "IGFBP3 drops by 45% in cirrhosis."}])
    out = llm_wording([h], bad)[0]
    assert out.text_source == "template" and out.statement == h.statement
    broken = ReplayBackend(["no json", "still none"])
    assert llm_wording([h], broken)[0].statement == h.statement
