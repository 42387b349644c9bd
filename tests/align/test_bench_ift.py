"""The IFT step benchmark: its tiny scale runs through the shared harness without an error case,
its providers compute the same loss (so the comparison is between equal work), and the
memory/time probe returns a row."""

import pytest
import torch

from lmfuse.bench import TimingPolicy, run_case, suite

ONCE = TimingPolicy(cpu_warmup=0, cpu_budget_s=0.0, cpu_min_reps=1, cpu_max_reps=1)  # runs, not timings


@pytest.fixture(scope="module")
def bench():
    return suite.load(suite.discover()["ift"])[1]


def test_tiny_cases_run_without_errors(bench):
    cases = bench.cases("tiny", torch.device("cpu"))
    assert len(cases) == 1 and cases[0].headline
    rows = [m for c in cases for m in run_case(c, ONCE)]
    assert not [(m.provider, m.note) for m in rows if m.status == "error"]
    assert {m.provider for m in rows if m.status == "ok"} == set(bench.PROVIDERS)
    assert all(m.op == "ift_step" and m.flops > 0 for m in rows)


def test_eager_and_fused_ift_compute_the_same_loss(bench):
    from lmfuse.align import ift_model_loss

    model, ids, labels, att = bench._Inputs("tiny", torch.device("cpu")).get()
    labels = labels.clone()
    labels[0, -3:] = -100
    fused = ift_model_loss(model, ids, labels, att).loss
    eager = bench.eager_ift_loss(model, ids, labels, att)
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-6)


def test_probe_reports_time_and_memory(bench):
    row = bench.probe("tiny", "lmfuse", 1)
    assert row["provider"] == "lmfuse" and len(row["times_s"]) == 1
    assert row["median_s"] > 0 and row["peak_extra_mib"] >= 0


def test_full_scale_adds_the_bf16_llama_1b_case_on_cuda(bench):
    """Checked without a GPU: the cases are built lazily, so listing them allocates nothing."""
    cpu = bench.cases("full", torch.device("cpu"))
    assert [c.shape for c in cpu] == ["B=4,T=512,model=smollm2-135m"]
    gpu = bench.cases("full", torch.device("cuda"))
    assert [(c.shape, c.dtype, c.headline) for c in gpu] == [
        ("B=4,T=512,model=smollm2-135m", torch.float32, True), ("B=4,T=1024,model=llama-1b", torch.bfloat16, False)]
    inputs = bench._Inputs("tiny", torch.device("cpu"), dtype=torch.bfloat16)
    assert {p.dtype for p in inputs.get()[0].parameters()} == {torch.bfloat16}
