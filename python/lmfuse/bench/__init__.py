"""The shared benchmark harness (see ``harness.py`` for the model, ``suite.py`` for how
``lmfuse bench`` finds and runs ``benchmarks/bench_<op>.py`` modules).

Writing a benchmark module::

    from lmfuse.bench import Case, Provider, ProviderUnavailable, Workload

    OP = "my_op"

    def cases(scale, device):
        x = torch.randn(..., device=device, requires_grad=True)
        def ours():
            return Workload(lambda: lmfuse.ops.my_op(x), grad_inputs=[x])
        return [Case(OP, "T=2048,d=4096", torch.bfloat16, device,
                     [Provider("lmfuse", ours), Provider("torch", ...)],
                     cost=lambda mode: my_op_cost(..., mode), baseline="torch", target="lmfuse")]
"""

from .harness import (MODES, Case, Measurement, Provider, ProviderUnavailable, Workload,
                      forced_backend_workload, llama_1b_config, run_case, training_model)
from .timing import Ceilings, Timing, TimingPolicy, efficiency, measure_ceilings, roofline_ms, summarize

__all__ = [
    "forced_backend_workload",
    "MODES", "Case", "Ceilings", "Measurement", "Provider", "ProviderUnavailable", "Timing",
    "TimingPolicy", "Workload", "efficiency", "measure_ceilings", "roofline_ms", "run_case", "summarize", "training_model",
    "llama_1b_config",
]
