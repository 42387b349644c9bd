"""Benchmark: one DPO step (loss + parameter gradients) of ``lmfuse.align.PreferenceTrainer`` vs
TRL 1.16's ``DPOTrainer``, on the same model, reference and batch.

Case ``dpo_step``: SmolLM2-135M-Instruct (the bundled model) as the policy, a frozen copy as the
reference (TRL's default when no reference is given), a batch of B pairs of T tokens (a quarter
prompt, the rest completion; chosen and rejected of different lengths, right-padded), loss type
``sigmoid``, β = 0.1, fp32. Mode ``full``: the policy forward, the reference forward and the
backward to every policy parameter (no optimizer step). Scales: full = 4 pairs × 512 tokens (the
issue's CPU size), and on CUDA also a Llama-3.2-1B-shaped model built from its config (random
weights, bfloat16, 4 pairs × 1024 tokens, vocabulary 128256); quick = 2 pairs × 128 tokens, tiny =
a 2-layer Llama, 2 pairs × 16 tokens (the test suite).

Providers:

``lmfuse``  ``PreferenceTrainer.compute_loss`` (log-probs through ``lmfuse.losses.sequence_log_probs``,
            the fused vocabulary kernels; no ``[2B, T, V]`` logits)
``trl``     ``trl.DPOTrainer.compute_loss`` (TRL 1.16 also avoids the logits, through its own
            chunked fused LM head) — the baseline

Both trainers are built once per case; only ``compute_loss`` and the backward are timed.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated``; on the CPU the harness records none, so
``python -m lmfuse.benchmarks.bench_align --memory --out DIR`` runs each provider in a fresh
process (glibc mmap threshold fixed at 64 KiB, so freed blocks return to the OS) and records the
peak **resident set** (VmHWM) of one step above the resident set just before it: activations,
logits or their chunks, and the returned gradients (the same ``4·params`` bytes for both).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

from lmfuse.bench import Case, Provider, ProviderUnavailable, Workload, training_model
from lmfuse.bench.timing import extra_memory_mib
from lmfuse.benchmarks.bench_linear_cross_entropy import _PROBE_ENV

OP = "dpo_step"
WORDS = ("<pad> <eos> the a cat dog sat ran on mat big small red blue is was and or yes no").split()


@dataclass(frozen=True)
class Spec:
    pairs: int
    seq: int
    model: str  # "smollm2-135m", "llama-1b" (from config) or "tiny-llama"
    dtype: str = "float32"

    @property
    def shape(self) -> str:
        return f"pairs={self.pairs},T={self.seq},model={self.model}"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)


def specs(scale: str, device: torch.device | None = None) -> list[Spec]:
    if scale == "tiny":
        return [Spec(2, 16, "tiny-llama")]
    if scale == "quick":
        return [Spec(2, 128, "smollm2-135m")]
    out = [Spec(4, 512, "smollm2-135m")]
    if device is not None and device.type == "cuda":
        out.append(Spec(4, 1024, "llama-1b", "bfloat16"))
    return out


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>")


class _Setup:
    """Policy, reference, tokenizer and one collated batch, made on first use."""

    def __init__(self, spec: Spec, device: torch.device):
        self.spec, self.device, self._v = spec, device, None

    def get(self):
        if self._v is None:
            s = self.spec
            if s.model == "smollm2-135m":
                from lmfuse.models import load_bundled_model
                try:
                    model, tok = load_bundled_model()
                except (FileNotFoundError, ImportError) as e:
                    raise ProviderUnavailable(f"bundled model unavailable: {e}") from e
                if tok.pad_token is None:
                    tok.pad_token = tok.eos_token
            elif s.model == "llama-1b":
                tok = _tiny_tokenizer()  # the batch is random ids; the tokenizer only builds the trainers
                model = training_model("llama-1b", self.device, s.torch_dtype)
            else:
                from transformers import LlamaConfig, LlamaForCausalLM
                torch.manual_seed(0)
                tok = _tiny_tokenizer()
                model = LlamaForCausalLM(LlamaConfig(
                    vocab_size=len(WORDS), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0))
            model = model.to(device=self.device, dtype=s.torch_dtype).train()
            import copy
            ref = copy.deepcopy(model).eval().requires_grad_(False)
            self._v = (model, ref, tok, self._batch(model.config.vocab_size, tok.pad_token_id))
        return self._v

    def _batch(self, vocab: int, pad: int) -> dict[str, torch.Tensor]:
        s, g = self.spec, torch.Generator().manual_seed(0)
        prompt = s.seq // 4
        n = 2 * s.pairs
        ids = torch.randint(2, vocab, (n, s.seq), generator=g)
        lengths = torch.randint(prompt + 2, s.seq + 1, (n,), generator=g)
        lengths[0] = s.seq  # the longest row sets T
        attention = (torch.arange(s.seq) < lengths[:, None]).long()
        completion = attention.clone()
        completion[:, :prompt] = 0
        ids[:, :prompt] = ids[:1, :prompt]  # one prompt per pair, shared by its chosen and rejected rows
        ids = ids.masked_fill(attention == 0, pad)
        return {k: v.to(self.device) for k, v in
                {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}.items()}


def _dummy_data():
    return [{"prompt": "the cat", "chosen": " sat on the mat", "rejected": " ran"}]


def _lmfuse(setup: _Setup) -> Workload:
    from lmfuse.align import PreferenceConfig, PreferenceTrainer

    model, ref, tok, batch = setup.get()
    args = PreferenceConfig(output_dir=os.path.join("/tmp", "lmfuse-bench-align"), beta=0.1, loss_type="sigmoid",
                            use_cpu=setup.device.type == "cpu", report_to=[], disable_tqdm=True, save_strategy="no")
    trainer = PreferenceTrainer(model, ref, args=args, train_dataset=_dummy_data(), processing_class=tok)
    params = [p for p in model.parameters() if p.requires_grad]
    return Workload(lambda: trainer.compute_loss(model, batch), params)


def _trl(setup: _Setup) -> Workload:
    try:
        import trl
        from datasets import Dataset
    except ImportError as e:
        raise ProviderUnavailable(f"trl is not installed: {e}") from None
    model, ref, tok, batch = setup.get()
    args = trl.DPOConfig(output_dir=os.path.join("/tmp", "trl-bench-align"), beta=0.1, loss_type=["sigmoid"],
                         use_cpu=setup.device.type == "cpu", bf16=False, gradient_checkpointing=False, report_to=[],
                         disable_tqdm=True, save_strategy="no")
    trainer = trl.DPOTrainer(model, ref, args=args, train_dataset=Dataset.from_list(_dummy_data()),
                             processing_class=tok)
    params = [p for p in model.parameters() if p.requires_grad]
    return Workload(lambda: trainer.compute_loss(model, batch), params)


PROVIDERS = {"lmfuse": _lmfuse, "trl": _trl}


def build_case(spec: Spec, device: torch.device) -> Case:
    setup = _Setup(spec, device)
    return Case(OP, spec.shape, spec.torch_dtype, device,
                [Provider(name, lambda f=f: f(setup)) for name, f in PROVIDERS.items()],
                baseline="trl", target="lmfuse", modes=("full",), headline=spec.model != "llama-1b",
                note=f"policy fwd + reference fwd + backward to every policy parameter, sigmoid loss, {spec.dtype}")


def cases(scale: str, device: torch.device) -> list[Case]:
    return [build_case(s, device) for s in specs(scale, device)]


# -- peak resident memory of one step, one fresh process per provider --------------------------

def probe(spec: Spec, provider: str, device: torch.device) -> dict:
    """Peak memory (MiB) of one step above what was resident (CPU) / allocated (CUDA) before it."""
    work = PROVIDERS[provider](_Setup(spec, device))
    params = list(work.grad_inputs)

    def step():
        return torch.autograd.grad(work.forward(), params)

    step()  # warm-up: thread pools, lazy imports, caches
    gc.collect()
    times = {}

    def timed():
        wall, cpu = time.perf_counter(), time.process_time()
        out = step()
        times.update(wall=time.perf_counter() - wall, cpu=time.process_time() - cpu)
        return out
    base, peak = extra_memory_mib(timed, device)
    row = {"extra_mib": peak - base, "base_mib": base}
    if device.type == "cpu":  # one step's wall and CPU time (CPU time is less sensitive to other load)
        row.update(step_wall_s=times["wall"], step_cpu_s=times["cpu"], threads=torch.get_num_threads())
    return row


def measure_memory(scale: str, device: torch.device, echo=print, timeout_s: float = 1800.0) -> list[dict]:
    rows = []
    for spec in specs(scale, device):
        for provider in PROVIDERS:
            cmd = [sys.executable, os.path.abspath(__file__), "--probe", json.dumps(asdict(spec)), provider, str(device)]
            row = {"op": OP, "shape": spec.shape, "provider": provider, "device": str(device)}
            try:
                r = subprocess.run(cmd, env=dict(os.environ, **_PROBE_ENV), capture_output=True, text=True,
                                   timeout=timeout_s)
                last = (r.stdout.strip().splitlines() or [""])[-1]
                if r.returncode == 0 and last.startswith("{"):
                    row.update(json.loads(last))
                else:
                    row["status"] = (r.stderr.strip().splitlines() or ["no output"])[-1][:300]
            except subprocess.TimeoutExpired:
                row["status"] = f"timeout after {timeout_s:.0f} s"
            rows.append(row)
            echo(f"{row['shape']:40s} {provider:7s} "
                 + (f"{row['extra_mib']:10.1f} MiB above {row['base_mib']:.0f} MiB" if "extra_mib" in row
                    else row["status"]))
    return rows


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--memory", action="store_true", help="measure the peak memory of one step per provider")
    ap.add_argument("--probe", nargs=3, metavar=("SPEC", "PROVIDER", "DEVICE"), help=argparse.SUPPRESS)
    ap.add_argument("--scale", default="quick", choices=("tiny", "quick", "full"))
    ap.add_argument("--out", default=None, help="directory for dpo_step_memory.json")
    args = ap.parse_args(argv)
    if args.probe:
        spec_json, provider, dev = args.probe
        try:
            result = probe(Spec(**json.loads(spec_json)), provider, torch.device(dev))
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
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, f"{OP}_memory.json"), "w") as f:
                json.dump({"what": "peak memory of one DPO step above the memory in use just before it (MiB); CPU: "
                                   "resident set, glibc mmap threshold fixed at 64 KiB; CUDA: max_memory_allocated",
                           **run_info(device).__dict__, "scale": args.scale, "rows": rows}, f, indent=1)
        return 0
    ap.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(_main())
