"""Benchmark: the vocabulary projection + loss of a language model, logits never built.

Cases (``op`` column):

``linear_cross_entropy``  mean cross-entropy of ``hidden [N, H] @ weight[V, H]ᵀ`` against targets
                          (10 % ignored), gradients to ``hidden`` and ``weight``.
``linear_log_probs``      per-token ``log p(target)`` (the DPO / GRPO building block), a random
                          upstream gradient per token.
``lm_train_step``         forward + backward of a whole causal LM (SmolLM2-135M, 4 × 512 tokens at
                          full scale) with its own loss vs ``lmfuse.losses.fused_causal_lm``.

Providers:

``lmfuse``            the op with its default path; ``lmfuse-<backend>`` each backend forced
                      (skipped where unavailable: Triton needs a GPU outside the tests; a forced
                      backend takes its statistics path, so on the CPU in float32 / bfloat16,
                      where the default is the chunked ATen path, ``lmfuse-cpp`` is timed too)
``eager``             ``F.linear`` then ``F.cross_entropy`` / ``log_softmax`` on fp32 logits (what
                      ``transformers`` models do) — the baseline
``torch-chunked``     ``torch.nn.functional.linear_cross_entropy`` with
                      ``LinearCrossEntropyOptions()`` (its chunked path, automatic chunk size;
                      on the CPU that picks chunks of a few rows and is not timed beyond the
                      tiny scale); ``torch-chunked-256``: the same with 256-row chunks
``trl-chunked``       TRL's ``ChunkedLogProbFunction`` (log-probs; when ``trl`` is importable)
``lmfuse-frozen-head``, ``eager-frozen-head``  (log-probs) the same with the head frozen, as under
                      LoRA: only ``hidden`` takes a gradient
``liger``, ``cce``    Liger-Kernel's fused linear CE and Apple's Cut Cross-Entropy (``cce`` and
                      ``cce_exact``), on CUDA when importable
``stock`` / ``fused`` (``lm_train_step``) the model's own loss / the fused one

Shapes: GPU bf16, H = 4096, N ∈ {4k, 16k, 32k}, V ∈ {32k, 128k} (quick: N = 16k, V = 128k, the
headline); CPU H = 576, V = 49152 (SmolLM2's head), N = 2048 (quick: 512), fp32 and bf16; tiny
(the test suite): N = 16, V = 257, H = 32, fp32. Inputs are made once per case and never
rotated. Flop and byte counts come from ``lmfuse.ops.linear_cross_entropy_cost`` and every
provider is credited the same work: forward ``2·N·H·V`` (the logits GEMM), backward ``6·N·H·V``
(the logits recomputed, ``dhidden``, ``dweight``), so full = ``8·N·H·V``; a provider that keeps
the forward's logits instead of recomputing them does less work than it is credited with.

Peak memory above the inputs: on CUDA the harness reports ``torch.cuda.max_memory_allocated``
(inputs included; the case note gives the input size). On the CPU the harness measures none, so
:func:`measure_memory` runs each (case, provider, mode) in a fresh process with glibc's mmap
threshold fixed at 64 KiB (freed blocks go back to the OS, so a process's resident size follows
its live allocations) and records the peak resident set above the resident set just before the
call — everything the call allocates, the C++ kernels' workspaces and the returned gradients
included. ``python -m lmfuse.benchmarks.bench_linear_cross_entropy --memory --out DIR`` writes
``linear_cross_entropy_memory.{csv,json}``.
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

from lmfuse.bench import Case, Provider, ProviderUnavailable, Workload, forced_backend_workload, training_model
from lmfuse.bench.harness import working_set_note
from lmfuse.bench.timing import extra_memory_mib

OP = "linear_cross_entropy"
IGNORED_FRACTION = 0.1
FORCED_BACKENDS = ("cpp", "triton", "reference")


@dataclass(frozen=True)
class Spec:
    """One benchmark shape. ``kind``: "ce", "logp" or "train" (``N`` tokens in rows of ``seq``
    through ``model``: "smollm2-135m" or "tiny-llama"; ``H``/``V`` unused)."""

    kind: str
    N: int
    H: int
    V: int
    dtype: str
    seq: int = 0
    model: str = ""

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def op(self) -> str:
        return {"ce": "linear_cross_entropy", "logp": "linear_log_probs", "train": "lm_train_step"}[self.kind]

    @property
    def shape(self) -> str:
        if self.kind == "train":
            return f"B={self.N // self.seq},T={self.seq},model={self.model}"
        return f"N={self.N},H={self.H},V={self.V}"


def specs(scale: str, device: torch.device) -> list[Spec]:
    if scale == "tiny":
        return [Spec("ce", 16, 32, 257, "float32"), Spec("logp", 16, 32, 257, "float32"),
                Spec("train", 2 * 16, 0, 0, "float32", seq=16, model="tiny-llama")]
    if device.type == "cuda":
        grid = [(16384, 131072)] if scale == "quick" else \
            [(n, v) for v in (32768, 131072) for n in (4096, 16384, 32768)]
        out = [Spec("ce", n, 4096, v, "bfloat16") for n, v in grid]
        return out + [Spec("logp", n, 4096, v, "bfloat16") for n, v in grid[:1 if scale == "quick" else 3]]
    n = 512 if scale == "quick" else 2048
    out = [Spec(kind, n, 576, 49152, dt) for kind in ("ce", "logp") for dt in ("float32", "bfloat16")]
    B, T = (1, 128) if scale == "quick" else (4, 512)
    return out + [Spec("train", B * T, 0, 0, "float32", seq=T, model="smollm2-135m")]


# run first by ``lmfuse bench`` (and kept if a time budget cuts the run short)
HEADLINES = (Spec("ce", 16384, 4096, 131072, "bfloat16"), Spec("ce", 2048, 576, 49152, "float32"),
             Spec("ce", 512, 576, 49152, "float32"), Spec("ce", 16, 32, 257, "float32"))


def cost(spec: Spec, mode: str) -> tuple[float, float]:
    """(flops, bytes) of one call: :func:`lmfuse.ops.linear_cross_entropy_cost` (the logits GEMM
    in the forward; recomputation, ``dhidden`` and ``dweight`` in the backward)."""
    from lmfuse import ops

    nb = torch.finfo(spec.torch_dtype).bits // 8
    return ops.linear_cross_entropy_cost(spec.N, spec.H, spec.V, nb, mode)


class _Inputs:
    """The tensors of one case, made on first use (``cases()`` stays cheap)."""

    def __init__(self, spec: Spec, device: torch.device, seed: int = 0):
        self.spec, self.device, self.seed, self._t = spec, device, seed, None

    def get(self):
        if self._t is None:
            s, g = self.spec, torch.Generator(device="cpu").manual_seed(self.seed)
            hidden = torch.randn(s.N, s.H, generator=g)
            weight = torch.randn(s.V, s.H, generator=g) * s.H ** -0.5 * 4  # logits spread over a few units
            target = torch.randint(0, s.V, (s.N,), generator=g)
            target[torch.rand(s.N, generator=g) < IGNORED_FRACTION] = -100
            self._t = (hidden.to(self.device, s.torch_dtype).requires_grad_(),
                       weight.to(self.device, s.torch_dtype).requires_grad_(), target.to(self.device))
        return self._t


# -- providers: each returns a Workload --------------------------------------------------------

def _default_backend(device: torch.device) -> str | None:
    """The backend the op picks for ``device`` (None when that cannot be told)."""
    from lmfuse import ops

    try:
        from lmfuse.ops._lce_autograd import PREFERENCE
    except ImportError:
        return None
    status = ops.available_backends()
    return next((b for b in PREFERENCE.get(device.type, ()) if status.get(b) and status[b].available), None)


def _lmfuse(inputs: _Inputs, kind: str, backend: str | None = None, frozen_head: bool = False) -> Workload:
    from lmfuse import ops
    from lmfuse.ops.linear_cross_entropy import chunked_by_default

    op_name = "linear_cross_entropy" if kind == "ce" else "linear_log_probs"
    if (backend is not None and backend == _default_backend(inputs.device) and inputs.spec.N > 64
            and not chunked_by_default(op_name, inputs.device, inputs.spec.torch_dtype)):
        raise ProviderUnavailable(f"{backend} is the default backend here: see the lmfuse row")
    h, w, t = inputs.get()
    op = ops.linear_cross_entropy if kind == "ce" else ops.linear_log_probs
    if frozen_head:  # only the hidden states take a gradient (a frozen head, as under LoRA)
        wf = w.detach()
        return Workload(lambda: op(h, wf, t), [h])
    return forced_backend_workload(lambda: op(h, w, t), [h, w], backend)


def _eager(inputs: _Inputs, kind: str, frozen_head: bool = False) -> Workload:
    h, w, t = inputs.get()
    if frozen_head:
        w = w.detach()
    leaves = [h] if frozen_head else [h, w]
    if kind == "ce":
        return Workload(lambda: F.cross_entropy(F.linear(h, w).float(), t, ignore_index=-100), leaves)

    def logp():
        lp = torch.log_softmax(F.linear(h, w).float(), -1).gather(-1, t.clamp(min=0)[:, None])[:, 0]
        return lp.masked_fill(t == -100, 0.0)
    return Workload(logp, leaves)


def _torch_chunked(inputs: _Inputs, kind: str, chunk: int | None = None) -> Workload:
    """``F.linear_cross_entropy`` on its chunked path: torch's automatic chunk size (``chunk``
    None, what a user gets from ``LinearCrossEntropyOptions()``) or a fixed one."""
    fn = getattr(F, "linear_cross_entropy", None)
    options = getattr(torch.nn, "LinearCrossEntropyOptions", None)
    if fn is None or options is None:
        raise ProviderUnavailable(f"torch {torch.__version__} has no chunked linear_cross_entropy")
    s = inputs.spec
    # allow_retain_graph: the harness's bwd mode runs backward repeatedly on one graph
    opts = options(allow_retain_graph=True, batch_chunk_size=chunk)
    if chunk is None and inputs.device.type == "cpu" and s.N > 64:
        auto = opts._adjust(s.N, s.H, s.V, s.torch_dtype, inputs.device).batch_chunk_size
        if auto < 64:
            raise ProviderUnavailable(
                f"torch's automatic chunking picks {auto}-row chunks here ({-(-s.N // auto)} chunks), "
                "tens of seconds per call on this CPU: not timed at this scale (the tiny scale runs it; "
                "see torch-chunked-256)")
    h, w, t = inputs.get()
    return Workload(lambda: fn(h, w, t, ignore_index=-100, options=opts), [h, w])


def _trl(inputs: _Inputs, kind: str) -> Workload:
    try:
        from trl.kernels import ChunkedLogProbFunction
    except ImportError as e:
        raise ProviderUnavailable(f"trl not importable: {e}") from e
    h, w, t = inputs.get()
    valid = t != -100
    safe = t.clamp(min=0)

    def logp():  # as TRL's trainers call it: fp32 log-probs, ignored positions zeroed after
        out = ChunkedLogProbFunction.apply(h, w, None, safe, 1.0, 32768, None, 1.0, ())[0]
        return out.masked_fill(~valid, 0.0)
    return Workload(logp, [h, w])


def _liger(inputs: _Inputs, kind: str) -> Workload:
    if inputs.device.type != "cuda":
        raise ProviderUnavailable("Liger-Kernel runs on CUDA only")
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as e:
        raise ProviderUnavailable(f"liger_kernel not importable: {e}") from e
    h, w, t = inputs.get()
    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=-100, accum_dtype=torch.float32)
    return Workload(lambda: loss(w, h, t), [h, w])


def _cce(inputs: _Inputs, kind: str, impl: str) -> Workload:
    if inputs.device.type != "cuda":
        raise ProviderUnavailable("Cut Cross-Entropy runs on CUDA only")
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as e:
        raise ProviderUnavailable(f"cut_cross_entropy not importable: {e}") from e
    h, w, t = inputs.get()
    return Workload(lambda: linear_cross_entropy(h, w, t, ignore_index=-100, impl=impl), [h, w])


def _providers(spec: Spec, inputs: _Inputs) -> list[Provider]:
    kind = spec.kind
    mk = lambda fn, *a: (lambda: fn(inputs, kind, *a))  # noqa: E731
    out = [Provider("lmfuse", mk(_lmfuse))]
    out += [Provider(f"lmfuse-{b}", mk(_lmfuse, b)) for b in FORCED_BACKENDS]
    out.append(Provider("eager", mk(_eager)))
    if kind == "ce":
        out += [Provider("torch-chunked", mk(_torch_chunked)), Provider("torch-chunked-256", mk(_torch_chunked, 256)),
                Provider("liger", mk(_liger)),
                Provider("cce", mk(_cce, "cce")), Provider("cce-exact", mk(_cce, "cce_exact"))]
    else:
        out.append(Provider("trl-chunked", mk(_trl)))
        # a frozen head (LoRA): only the hidden states take a gradient
        out += [Provider("lmfuse-frozen-head", lambda: _lmfuse(inputs, kind, None, True)),
                Provider("eager-frozen-head", lambda: _eager(inputs, kind, True))]
    return out


# -- the training-step case --------------------------------------------------------------------

class _TrainInputs:
    """A causal LM (SmolLM2-135M, or a tiny Llama for the tests) and one batch of token ids."""

    def __init__(self, spec: Spec, device: torch.device):
        self.spec, self.device, self._m = spec, device, None

    def get(self):
        if self._m is None:
            B, T = self.spec.N // self.spec.seq, self.spec.seq
            model = training_model(self.spec.model, self.device)
            ids = torch.randint(0, model.config.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
            self._m = (model, ids.to(self.device))
        return self._m


def _train_step(inputs: _TrainInputs, fused: bool) -> Workload:
    model, ids = inputs.get()
    params = [p for p in model.parameters() if p.requires_grad]
    if fused:
        from lmfuse.losses import causal_lm_loss
        return Workload(lambda: causal_lm_loss(model, ids, ids), params)
    return Workload(lambda: model(input_ids=ids, labels=ids).loss, params)


def _train_cost(spec: Spec, inputs: _TrainInputs, mode: str) -> tuple[float, float]:
    """6·params·tokens for forward + backward (2 forward, 4 backward); bytes: the weights, read
    in the forward, read again and their gradients written in the backward."""
    model, _ = inputs.get()
    n = sum(p.numel() for p in model.parameters())
    fwd, bwd = (2.0 * n * spec.N, 4.0 * n), (4.0 * n * spec.N, 8.0 * n)
    return {"fwd": fwd, "bwd": bwd, "full": (fwd[0] + bwd[0], fwd[1] + bwd[1])}[mode]


def build_case(spec: Spec, device: torch.device) -> Case:
    if spec.kind == "train":
        inputs = _TrainInputs(spec, device)
        providers = [Provider("stock", lambda: _train_step(inputs, False)),
                     Provider("fused", lambda: _train_step(inputs, True))]
        return Case(spec.op, spec.shape, spec.torch_dtype, device, providers,
                    cost=lambda mode: _train_cost(spec, inputs, mode), baseline="stock", target="fused",
                    modes=("full",), note="forward + backward of the whole model, no optimizer step")
    inputs = _Inputs(spec, device)
    nb = torch.finfo(spec.torch_dtype).bits // 8
    working_set = nb * (spec.N * spec.H + spec.V * spec.H) + 8 * spec.N
    note = working_set_note(working_set, device) + f"; inputs {working_set / 2**20:.1f} MiB"
    # paired: the CPU's speed drifts within a run on a shared host; lmfuse and eager are close
    # enough in fp32 that only alternating pairs tell them apart
    return Case(spec.op, spec.shape, spec.torch_dtype, device, _providers(spec, inputs),
                cost=lambda mode: cost(spec, mode), baseline="eager", target="lmfuse", note=note,
                headline=spec in HEADLINES, paired=device.type == "cpu")


def cases(scale: str, device: torch.device) -> list[Case]:
    return [build_case(s, device) for s in specs(scale, device)]


# -- peak memory above the inputs, one fresh process per measurement ---------------------------



def _mode_call(work: Workload, mode: str):
    if mode == "fwd":
        return work.forward
    inputs = [t for t in work.grad_inputs if t.requires_grad]

    def full():
        outs = work.forward()
        outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
        return torch.autograd.grad(outs, inputs, [torch.ones_like(o) for o in outs])
    return full


def probe(spec: Spec, provider: str, mode: str, device: torch.device) -> dict:
    """Peak memory (MiB) of one call above what was resident (CPU) / allocated (CUDA) before it."""
    case = build_case(spec, device)
    prov = next(p for p in case.providers if p.name == provider)
    work = prov.build()
    call = _mode_call(work, mode)
    ctx = work.context() if work.context else None
    if ctx:
        ctx.__enter__()
    try:
        call()  # warm-up: thread pools, lazy imports, caches
        gc.collect()
        base, peak = extra_memory_mib(call, device)
    finally:
        if ctx:
            ctx.__exit__(None, None, None)
    return {"extra_mib": peak - base, "base_mib": base}


_PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def measure_memory_for(spec: Spec, providers, modes, device: torch.device, timeout_s: float = 900.0) -> list[dict]:
    """Rows for one spec: each provider and mode probed in a fresh process (see :func:`probe`)."""
    rows = []
    env = dict(os.environ, **_PROBE_ENV)
    for provider in providers:
        for mode in modes:
            cmd = [sys.executable, os.path.abspath(__file__), "--probe", json.dumps(asdict(spec)),
                   provider, mode, str(device)]
            row = {"op": spec.op, "shape": spec.shape, "dtype": spec.dtype, "provider": provider, "mode": mode,
                   "device": str(device)}
            try:
                r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
                last = (r.stdout.strip().splitlines() or [""])[-1]
                if r.returncode == 0 and last.startswith("{"):
                    row.update(json.loads(last))
                else:
                    row["status"] = (r.stderr.strip().splitlines() or ["no output"])[-1][:300]
            except subprocess.TimeoutExpired:
                row["status"] = f"timeout after {timeout_s:.0f} s"
            rows.append(row)
    return rows


def measure_memory(scale: str, device: torch.device, modes=("fwd", "full"), echo=print) -> list[dict]:
    """One row per (case, provider, mode): the peak memory above the inputs, or why there is none."""
    rows = []
    for spec in specs(scale, device):
        case = build_case(spec, device)
        for row in measure_memory_for(spec, [p.name for p in case.providers],
                                      [m for m in modes if m in case.modes], device):
            rows.append(row)
            echo(f"{row['op']:22s} {row['shape']:34s} {row['dtype']:9s} {row['provider']:17s} {row['mode']:5s} "
                 + (f"{row['extra_mib']:10.1f} MiB" if "extra_mib" in row else row["status"]))
    return rows


def write_memory(rows: list[dict], out_dir: str, info: dict) -> None:
    import csv

    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, f"{OP}_memory")
    keys = ["op", "shape", "dtype", "provider", "mode", "device", "extra_mib", "base_mib", "status"]
    with open(stem + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in keys})
    with open(stem + ".json", "w") as f:
        json.dump({"what": "peak memory of one call above the memory in use just before it (MiB); CPU: "
                           "resident set, glibc mmap threshold fixed at 64 KiB; CUDA: max_memory_allocated",
                   **info, "rows": rows}, f, indent=1)


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--memory", action="store_true", help="measure peak memory above the inputs")
    ap.add_argument("--probe", nargs=4, metavar=("SPEC", "PROVIDER", "MODE", "DEVICE"), help=argparse.SUPPRESS)
    ap.add_argument("--scale", default="quick", choices=("tiny", "quick", "full"))
    ap.add_argument("--out", default=None, help="directory for linear_cross_entropy_memory.{csv,json}")
    args = ap.parse_args(argv)
    if args.probe:
        spec_json, provider, mode, dev = args.probe
        try:
            result = probe(Spec(**json.loads(spec_json)), provider, mode, torch.device(dev))
        except ProviderUnavailable as e:
            print(f"unavailable: {e}", file=sys.stderr)
            return 3
        print(json.dumps(result))
        return 0
    if args.memory:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        rows = measure_memory(args.scale, device)
        if args.out:
            from lmfuse.bench.report import run_info
            write_memory(rows, args.out, {**run_info(device).__dict__, "scale": args.scale})
        return 0
    ap.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(_main())
