"""Benchmark: one IFT step (two passes + one backward) against an eager IFT step and plain SFT.

Case (``op`` = ``ift_step``): a causal LM, a batch of ``B × T`` tokens whose first quarter is
prompt (``labels = -100``), forward + backward of the whole step, no optimizer step.

Providers:

``lmfuse``      :func:`lmfuse.align.ift_model_loss`: the first pass keeps only a fused argmax
                per position, the second pass a fused log-prob per token; no ``[B, T, V]`` logits
``eager-ift``   the same step written as the published code does it: full logits in both passes,
                ``argmax`` and ``log_softmax`` over them (float32), then the same IFT weighting
``sft-fused``   plain SFT through :func:`lmfuse.losses.causal_lm_loss` (one pass; the floor)
``sft-stock``   plain SFT with the model's own loss (``model(..., labels=...).loss``)

Scales: tiny (tests) a 2-layer Llama, 2 × 16 tokens; quick SmolLM2-135M, 1 × 128 tokens; full
SmolLM2-135M, 4 × 512 tokens (vocabulary 49152), float32, and on CUDA also a Llama-3.2-1B-shaped
model from its config (:func:`lmfuse.bench.llama_1b_config`), bfloat16, 4 × 1024 tokens
(vocabulary 128256). Flops: ``2·P·N`` per forward and ``4·P·N`` per
backward (``P`` parameters, ``N`` tokens), so IFT is credited ``8·P·N`` and SFT ``6·P·N``.

The shared harness times the cases (``lmfuse bench --ops ift``); on the CPU it measures no
memory, so ``python benchmarks/bench_ift.py --scale full [--shape B,T] --out DIR`` runs each provider in a fresh
process and records the wall time (median of ``--reps`` steps after one warm-up) and the peak
resident memory above what the process held before the step (glibc's mmap threshold fixed at
64 KiB so freed blocks leave the resident set), writing ``ift_step.{json,csv}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

from lmfuse.bench import Case, Provider, Workload, training_model
from lmfuse.bench.timing import status_mib

OP = "ift_step"
PROVIDERS = ("lmfuse", "eager-ift", "sft-fused", "sft-stock")
SHAPES = {"tiny": (2, 16, "tiny-llama"), "quick": (1, 128, "smollm2-135m"), "full": (4, 512, "smollm2-135m")}
GPU_SHAPE = (4, 1024, "llama-1b")  # full scale on CUDA, bfloat16, after the SmolLM2 case


class _Inputs:
    """The model and one batch, made on first use (``cases()`` stays cheap)."""

    def __init__(self, scale: str, device: torch.device, shape: tuple[int, int] | None = None,
                 model: tuple[int, int, str] | None = None, dtype: torch.dtype = torch.float32):
        self.scale, self.device, self.shape, self._m = scale, device, shape, None
        self.spec, self.dtype = model or SHAPES[scale], dtype

    def get(self):
        if self._m is None:
            B, T, name = self.spec
            if self.shape is not None:
                B, T = self.shape
            model = training_model(name, self.device, self.dtype)
            g = torch.Generator().manual_seed(0)
            ids = torch.randint(0, model.config.vocab_size, (B, T), generator=g).to(self.device)
            labels = ids.clone()
            labels[:, : T // 4] = -100
            self._m = (model, ids, labels, torch.ones_like(ids))
        return self._m


def eager_ift_loss(model, ids, labels, att, lam: float = 0.2, gamma: float = 0.95):
    """IFT with the ``[B, T, V]`` logits materialised in both passes (the published way)."""
    from lmfuse.align import ift_loss

    emb = model.get_input_embeddings()
    with torch.no_grad():
        e = emb(ids)
        pred = model(inputs_embeds=e, attention_mask=att).logits.argmax(-1)
    x_tilde = torch.where(labels == -100, ids, torch.cat([ids[:, :1], pred[:, :-1]], 1))
    with torch.no_grad():
        mixed = (1 - lam) * e + lam * emb(x_tilde)
    logits = model(inputs_embeds=mixed, attention_mask=att).logits[:, :-1].float()
    tgt = labels[:, 1:]
    mask = tgt != -100
    logp = torch.log_softmax(logits, -1).gather(-1, tgt.clamp(min=0)[..., None])[..., 0]
    return ift_loss(logp, mask, gamma=gamma)


def _workload(inputs: _Inputs, provider: str) -> Workload:
    from lmfuse.align import ift_model_loss
    from lmfuse.losses import causal_lm_loss

    model, ids, labels, att = inputs.get()
    # IFT builds its inputs without a gradient to the embedding table (as published): every
    # provider differentiates the same parameters, the input embedding excluded unless tied to the head
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    params = [p for p in model.parameters() if p.requires_grad and (p is not emb or p is head)]
    fn = {
        "lmfuse": lambda: ift_model_loss(model, ids, labels, att).loss,
        "eager-ift": lambda: eager_ift_loss(model, ids, labels, att),
        "sft-fused": lambda: causal_lm_loss(model, ids, labels, att),
        "sft-stock": lambda: model(input_ids=ids, attention_mask=att, labels=labels).loss,
    }[provider]
    return Workload(fn, params)


def _cost(inputs: _Inputs, provider: str, mode: str) -> tuple[float, float]:
    model, ids, _, _ = inputs.get()
    P, N = sum(p.numel() for p in model.parameters()), ids.numel()
    passes = 1 if provider.startswith("sft") else 2
    return (2.0 * P * N * passes + 4.0 * P * N, 4.0 * P * (passes + 2))


def cases(scale: str, device: torch.device) -> list[Case]:
    specs = [(SHAPES[scale], torch.float32)]
    if scale == "full" and device.type == "cuda":
        specs.append((GPU_SHAPE, torch.bfloat16))
    out = []
    for (B, T, name), dtype in specs:
        inputs = _Inputs(scale, device, model=(B, T, name), dtype=dtype)
        providers = [Provider(p, (lambda p=p, i=inputs: _workload(i, p)),
                              cost=(lambda mode, p=p, i=inputs: _cost(i, p, mode))) for p in PROVIDERS]
        out.append(Case(OP, f"B={B},T={T},model={name}", dtype, device, providers, baseline="eager-ift",
                        target="lmfuse", modes=("full",), headline=name != GPU_SHAPE[2],
                        note="forward + backward of one IFT step (λ=0.2, γ=0.95), no optimizer step"))
    return out


# -- wall time and peak resident memory, one fresh process per provider ------------------------

def probe(scale: str, provider: str, reps: int, shape: tuple[int, int] | None = None) -> dict:
    inputs = _Inputs(scale, torch.device("cpu"), shape)
    work = _workload(inputs, provider)
    params = list(work.grad_inputs)

    def step():
        return torch.autograd.grad(work.forward(), params)

    step()  # warm-up: thread pools, lazy imports
    import gc
    gc.collect()
    base = status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set to the current one
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = step()
        times.append(time.perf_counter() - t0)
        del out
    return {"provider": provider, "median_s": statistics.median(times), "times_s": times,
            "peak_extra_mib": status_mib("VmHWM") - base, "base_mib": base}


def measure(scale: str, reps: int, out_dir: str | None, shape: tuple[int, int] | None = None) -> list[dict]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    rows = []
    for provider in PROVIDERS:
        cmd = [sys.executable, os.path.abspath(__file__), "--probe", scale, provider, str(reps)]
        if shape is not None:
            cmd += ["--shape", f"{shape[0]},{shape[1]}"]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        last = (r.stdout.strip().splitlines() or [""])[-1]
        row = json.loads(last) if r.returncode == 0 and last.startswith("{") else \
            {"provider": provider, "status": (r.stderr.strip().splitlines() or ["no output"])[-1][:300]}
        B, T, name = SHAPES[scale]
        B, T = shape or (B, T)
        row.update(op=OP, shape=f"B={B},T={T},model={name}", scale=scale, reps=reps,
                   load_avg=os.getloadavg()[0], torch=torch.__version__, threads=torch.get_num_threads())
        rows.append(row)
        print(json.dumps(row), flush=True)
    if out_dir:
        import csv

        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f"{OP}.json"), "w") as f:
            json.dump(rows, f, indent=1)
        keys = ["op", "shape", "provider", "median_s", "peak_extra_mib", "base_mib", "reps", "load_avg", "torch",
                "threads", "status"]
        with open(os.path.join(out_dir, f"{OP}.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=tuple(SHAPES), default="quick")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None)
    ap.add_argument("--shape", default=None, help="B,T instead of the scale's batch shape")
    ap.add_argument("--probe", nargs=3, metavar=("SCALE", "PROVIDER", "REPS"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    shape = tuple(int(v) for v in a.shape.split(",")) if a.shape else None
    if a.probe:
        print(json.dumps(probe(a.probe[0], a.probe[1], int(a.probe[2]), shape)))
        return 0
    measure(a.scale, a.reps, a.out, shape)
    return 0


if __name__ == "__main__":
    sys.exit(main())
