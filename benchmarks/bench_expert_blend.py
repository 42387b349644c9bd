"""Benchmark: token-level expert blending (UltraFuser) — the blended loss and the decode step.

Cases (``op`` column):

``expert_blend_cross_entropy``   mean cross entropy of the logit blend ``Σ_e gate_e·(h_e W_eᵀ)`` of
                                 E = 3 experts (10 % of targets ignored, softmax gates); gradients
                                 to every hidden state, head and the gate (stage 2).
``expert_blend_stage1``          the same loss with the experts frozen: only the gate has a gradient
                                 (stage 1). ``full`` is one stage-1 step's loss and gate gradient.
``expert_blend_decode_step``     blend E = 3 experts' ``[B, V]`` last-position logits with the gate
                                 and sample one token per row (temperature 1, top-p 0.9), returning
                                 its log-probability; B ∈ {1, 8, 64}. Tokens/s = B / time.

Providers:

``lmfuse``         the op as a user calls it (its own path and backend choice: the concatenation
                   route onto ``linear_cross_entropy``'s kernels for stage 2, the statistics op for
                   stage 1, the shared sampler for decoding)
``lmfuse-concat``  (stage 1) the op with ``LMFUSE_BACKEND=cpp`` (CPU) / ``triton`` (CUDA), which
                   takes the concatenation route instead of the statistics op
``eager``          what a user writes without lmfuse: E ``F.linear`` logits in float32, the blend,
                   ``F.cross_entropy`` (loss); the blend, ``softmax``, top-p by a sort,
                   ``torch.multinomial`` and a ``log_softmax`` gather (decode) — the baseline

Shapes: CPU float32, E = 3, H = 576 each, V = 49152 (SmolLM2's head), N = 1024 (quick: 256);
decode V = 49152, B ∈ {1, 8, 64}. GPU (CUDA only) bfloat16, E = 3, H = 4096, V = 32000, N = 8192;
decode V = 32000. tiny (the test suite): N = 16, H = 16/24/32, V = 257. Inputs are made once per
case and never rotated. Flop and byte counts: :func:`lmfuse.ops.expert_blend.cost` (forward
``2·N·V·ΣH``; stage-2 backward ``6·N·V·ΣH``; stage-1 backward no GEMM) and ``decode_cost``.

Peak memory: on CUDA the harness reports ``torch.cuda.max_memory_allocated``. On the CPU
``python benchmarks/bench_expert_blend.py --memory [--scale quick] [--out DIR]`` runs each
(case, provider, mode) in a fresh process (glibc mmap threshold 64 KiB, so the resident set
follows the live allocations) and reports the peak resident set above the one before the call.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from lmfuse.bench import Case, Provider, Workload, forced_backend_workload
from lmfuse.bench.harness import working_set_note
from lmfuse.bench.timing import extra_memory_mib

OP = "expert_blend_cross_entropy"
IGNORED_FRACTION = 0.1


@dataclass(frozen=True)
class Spec:
    """``kind``: "ce" (stage 2), "stage1" or "decode" (``N`` = the batch B)."""

    kind: str
    N: int
    Hs: tuple
    V: int
    dtype: str

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def op(self) -> str:
        return {"ce": OP, "stage1": "expert_blend_stage1", "decode": "expert_blend_decode_step"}[self.kind]

    @property
    def shape(self) -> str:
        hs = "/".join(str(h) for h in self.Hs)
        if self.kind == "decode":
            return f"B={self.N},E={len(self.Hs)},V={self.V}"
        return f"N={self.N},E={len(self.Hs)},H={hs},V={self.V}"


def specs(scale: str, device: torch.device) -> list[Spec]:
    if scale == "tiny":
        return [Spec(k, 16, (16, 24, 32), 257, "float32") for k in ("ce", "stage1")] + \
               [Spec("decode", 2, (0, 0, 0), 257, "float32")]
    if device.type == "cuda":
        hs, V, dt, n = (4096,) * 3, 32000, "bfloat16", 8192
    else:
        hs, V, dt, n = (576,) * 3, 49152, "float32", (256 if scale == "quick" else 1024)
    return [Spec("ce", n, hs, V, dt), Spec("stage1", n, hs, V, dt)] + \
           [Spec("decode", b, (0,) * 3, V, dt) for b in (1, 8, 64)]


HEADLINES = (Spec("ce", 8192, (4096,) * 3, 32000, "bfloat16"), Spec("ce", 1024, (576,) * 3, 49152, "float32"),
             Spec("ce", 256, (576,) * 3, 49152, "float32"), Spec("ce", 16, (16, 24, 32), 257, "float32"))


class _Inputs:
    def __init__(self, spec: Spec, device: torch.device):
        self.spec, self.device, self._t = spec, device, None

    def get(self):
        if self._t is None:
            s, g = self.spec, torch.Generator().manual_seed(0)
            dt, dev = s.torch_dtype, self.device
            E = len(s.Hs)
            gate = torch.softmax(torch.randn(s.N, E, generator=g), 1).to(dev).requires_grad_()
            if s.kind == "decode":
                logits = [(torch.randn(s.N, s.V, generator=g) * 3).to(dev, dt) for _ in range(E)]
                self._t = (logits, gate.detach())
                return self._t
            train = s.kind == "ce"
            hs = [torch.randn(s.N, h, generator=g).to(dev, dt).requires_grad_(train) for h in s.Hs]
            ws = [(torch.randn(s.V, h, generator=g) * h ** -0.5 * 4).to(dev, dt).requires_grad_(train) for h in s.Hs]
            t = torch.randint(0, s.V, (s.N,), generator=g)
            t[torch.rand(s.N, generator=g) < IGNORED_FRACTION] = -100
            self._t = (hs, ws, gate, t.to(dev))
        return self._t


def eager_loss(hiddens, weights, gate, target):
    """E float32 logits, the blend, one cross entropy (what a user writes)."""
    z = sum(gate[:, e, None] * F.linear(h, w).float() for e, (h, w) in enumerate(zip(hiddens, weights)))
    return F.cross_entropy(z, target, ignore_index=-100)


def eager_decode(logits, gate, generator, top_p=0.9):
    z = sum(gate[:, e, None] * o.float() for e, o in enumerate(logits))
    probs = torch.softmax(z, -1)
    srt, idx = torch.sort(probs, -1, descending=True)
    drop = (torch.cumsum(srt, -1) - srt) >= top_p
    kept = srt.masked_fill(drop, 0.0)
    tok = idx.gather(1, torch.multinomial(kept, 1, generator=generator)).squeeze(1)
    return tok, torch.log_softmax(z, -1).gather(1, tok[:, None]).squeeze(1)


def _leaves(inputs):
    hs, ws, gate, _ = inputs.get()
    return [t for t in (*hs, *ws, gate) if t.requires_grad]


def _ours(inputs: _Inputs, backend=None) -> Workload:
    from lmfuse import ops

    hs, ws, gate, t = inputs.get()
    return forced_backend_workload(lambda: ops.expert_blend_cross_entropy(hs, ws, gate, t), _leaves(inputs), backend)


def _eager(inputs: _Inputs) -> Workload:
    hs, ws, gate, t = inputs.get()
    return Workload(lambda: eager_loss(hs, ws, gate, t), _leaves(inputs))


def _ours_decode(inputs: _Inputs) -> Workload:
    from lmfuse import ops

    logits, gate = inputs.get()
    gen = torch.Generator(device=inputs.device).manual_seed(0)
    return Workload(lambda: ops.expert_blend_decode_step(logits, gate, temperature=1.0, top_p=0.9,
                                                         generator=gen).tokens)


def _eager_decode(inputs: _Inputs) -> Workload:
    logits, gate = inputs.get()
    gen = torch.Generator(device=inputs.device).manual_seed(0)
    return Workload(lambda: eager_decode(logits, gate, gen)[0])


def build_case(spec: Spec, device: torch.device) -> Case:
    from lmfuse.ops.expert_blend import cost, decode_cost

    inputs = _Inputs(spec, device)
    nb = torch.finfo(spec.torch_dtype).bits // 8
    E = len(spec.Hs)
    if spec.kind == "decode":
        providers = [Provider("lmfuse", lambda: _ours_decode(inputs)), Provider("eager", lambda: _eager_decode(inputs))]
        fl, by = decode_cost(spec.N, E, spec.V, nb)
        return Case(spec.op, spec.shape, spec.torch_dtype, device, providers, cost=lambda mode: (fl, by),
                    baseline="eager", target="lmfuse", modes=("fwd",),
                    note=working_set_note(by, device) + f"; tokens/s = {spec.N} / time")
    providers = [Provider("lmfuse", lambda: _ours(inputs))]
    if spec.kind == "stage1":
        concat = "triton" if device.type == "cuda" else "cpp"
        providers.append(Provider("lmfuse-concat", lambda: _ours(inputs, concat)))
    providers.append(Provider("eager", lambda: _eager(inputs)))
    K = sum(spec.Hs)
    ws = nb * (spec.N * K + spec.V * K) + 4 * spec.N * E
    note = working_set_note(ws, device) + f"; inputs {ws / 2**20:.1f} MiB"
    return Case(spec.op, spec.shape, spec.torch_dtype, device, providers,
                cost=lambda mode: cost(spec.N, spec.Hs, spec.V, nb, mode, stage1=spec.kind == "stage1"),
                baseline="eager", target="lmfuse", note=note, headline=spec in HEADLINES)


def cases(scale: str, device: torch.device) -> list[Case]:
    return [build_case(s, device) for s in specs(scale, device)]


# -- peak memory above the inputs (CPU: one fresh process per measurement) --------------------

def probe(spec: Spec, provider: str, mode: str, device: torch.device) -> dict:
    """Peak memory (MiB) of one call above what was resident (CPU) / allocated (CUDA) before it."""
    case = build_case(spec, device)
    work = next(p for p in case.providers if p.name == provider).build()
    leaves = [t for t in work.grad_inputs if t.requires_grad]

    def call():
        out = work.forward()
        if mode == "full":
            return torch.autograd.grad(out, leaves)
        return out

    import contextlib
    with (work.context() if work.context else contextlib.nullcontext()):
        call()  # warm-up
        gc.collect()
        base, peak = extra_memory_mib(call, device)
    return {"extra_mib": peak - base, "base_mib": base}


def measure_memory(scale: str, device: torch.device, echo=print) -> list[dict]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    rows = []
    for spec in specs(scale, device):
        if spec.kind == "decode":
            continue
        for prov in build_case(spec, device).providers:
            for mode in ("fwd", "full"):
                cmd = [sys.executable, os.path.abspath(__file__), "--probe", json.dumps(asdict(spec)), prov.name,
                       mode, str(device)]
                r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
                last = (r.stdout.strip().splitlines() or [""])[-1]
                row = {"op": spec.op, "shape": spec.shape, "dtype": spec.dtype, "provider": prov.name, "mode": mode}
                if r.returncode == 0 and last.startswith("{"):
                    row.update(json.loads(last))
                else:
                    row["status"] = (r.stderr.strip().splitlines() or ["no output"])[-1][:300]
                rows.append(row)
                echo(f"{row['op']:28s} {row['shape']:36s} {row['provider']:14s} {mode:5s} "
                     + (f"{row['extra_mib']:9.1f} MiB" if "extra_mib" in row else row["status"]))
    return rows


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--memory", action="store_true", help="measure peak memory above the inputs")
    ap.add_argument("--probe", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--scale", default="quick", choices=("tiny", "quick", "full"))
    ap.add_argument("--out", default=None, help="directory for expert_blend_memory.json")
    args = ap.parse_args(argv)
    if args.probe:
        spec_json, provider, mode, dev = args.probe
        d = json.loads(spec_json)
        d["Hs"] = tuple(d["Hs"])
        print(json.dumps(probe(Spec(**d), provider, mode, torch.device(dev))))
        return 0
    if args.memory:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        rows = measure_memory(args.scale, device)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "expert_blend_memory.json"), "w") as f:
                json.dump({"what": "peak memory of one call above the memory in use before it (MiB)",
                           "scale": args.scale, "device": str(device), "rows": rows}, f, indent=1)
        return 0
    ap.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(_main())
