"""Benchmark: end-to-end greedy speculative generation (``lmfuse.collab.speculative_generate``)
against transformers' own assisted generation with the same draft, on the CPU.

Model: the bundled SmolLM2-135M-Instruct (``quick``/``full``; a tiny random Llama at ``tiny``,
for the tests). Draft: the same model truncated to its first ``L`` layers (weights shared), and
prompt lookup. One timed call = one whole ``generate`` of ``max_new_tokens`` tokens for the batch.

Providers (every output is checked token for token against the target's own greedy
``generate`` while the workload is built; a mismatch is an error row, never a timing):

``lmfuse-speculative``   speculative_generate with the truncated draft (the target row)
``hf-assisted``          ``target.generate(assistant_model=draft)`` (the baseline; transformers
                         refuses batch > 1: a skipped row says so)

Both draft up to ``k`` tokens per step and stop a step's drafting early after a draft token the
draft model gives probability < ``conf`` (transformers' ``assistant_confidence_threshold``,
default 0.4; pinned here, because with scikit-learn installed transformers would instead
re-tune it during the call). ``conf=0`` rows compare the constant-``k`` algorithm.
``lmfuse-prompt-lookup`` speculative_generate with :class:`PromptLookupDrafter`
``hf-prompt-lookup``     ``target.generate(prompt_lookup_num_tokens=k)`` (batch 1 only)
``hf-greedy``            the target alone (what speculation must beat)

Ratios: batch 1 is compared with ``hf-assisted`` / ``hf-prompt-lookup``, batch 4 (which
transformers refuses) with ``hf-greedy``; the table has one ratio column per baseline, named
after it, and a cell is empty where that row's baseline is another or did not run.

No flop/byte formula: the cost of a speculative run depends on acceptance, so rows report time
only. The CPU is whatever this machine is; on a shared machine, times are noisy (p20/p80).
"""

from __future__ import annotations

import torch

from lmfuse.bench import Case, Provider, ProviderUnavailable, Workload

OP = "speculative_generate"
PROMPTS = ["Explain in two sentences why the sky is blue.", "Write a short poem about the sea and the wind.",
           "What is 12 times 7? Answer, then repeat the question.", "List the planets of the solar system."]


def _models(scale: str):
    """(target, tokenizer or None, vocab) for the scale."""
    if scale == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, initializer_range=0.3)
        model = LlamaForCausalLM(cfg).eval()
        model.generation_config.eos_token_id = None
        return model, None
    from lmfuse.models import load_bundled_model

    return load_bundled_model()


def _prompts(tok, batch: int, device):
    if tok is None:
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(3, 128, (batch, 12), generator=g)
        mask = torch.ones_like(ids)
        for b in range(batch):  # ragged, left-padded
            mask[b, : 3 * b] = 0
            ids[b, : 3 * b] = 0
        return ids.to(device), mask.to(device), None, 0
    tok.padding_side = "left"
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in PROMPTS[:batch]]
    enc = tok(texts, return_tensors="pt", padding=True).to(device)
    return enc["input_ids"], enc["attention_mask"], tok.eos_token_id, tok.pad_token_id


def _checked(run, reference: torch.Tensor, name: str) -> Workload:
    out = run()
    if not torch.equal(out, reference):
        raise RuntimeError(f"{name}: output differs from the target's greedy generate")
    return Workload(run)


def _padded(seqs: torch.Tensor, width: int, pad: int) -> torch.Tensor:
    full = torch.full((seqs.shape[0], width), pad, dtype=torch.long, device=seqs.device)
    full[:, : seqs.shape[1]] = seqs
    return full


def cases(scale: str, device: torch.device) -> list[Case]:
    from lmfuse.collab import PromptLookupDrafter, speculative_generate, truncate_layers

    if device.type != "cpu":
        return []  # the end-to-end comparison asked for is a CPU one; GPU numbers are per-op
    target, tok = _models(scale)
    n_new = {"tiny": 8, "quick": 24, "full": 32}[scale]
    k = 4
    # drafts shorter than 20 of 30 layers agree too rarely to be worth minutes of CPU time each
    layer_choices = {"tiny": (2,), "quick": (20,), "full": (20, 24)}[scale]
    out = []
    for batch in (1, 4):
        ids, mask, eos, pad = _prompts(tok, batch, device)
        width = ids.shape[1] + n_new
        hf_kw = dict(attention_mask=mask, max_new_tokens=n_new, do_sample=False, eos_token_id=eos, pad_token_id=pad)
        with torch.no_grad():
            reference = _padded(target.generate(ids, **hf_kw), width, pad)

        def hf_greedy(ids=ids, hf_kw=hf_kw, width=width, pad=pad, reference=reference):
            return _checked(lambda: _padded(target.generate(ids, **hf_kw), width, pad), reference, "hf-greedy")

        for layers, conf in [(n, c) for n in layer_choices for c in (0.4, 0.0)]:
            draft = truncate_layers(target, layers)
            draft.generation_config.num_assistant_tokens = k
            draft.generation_config.num_assistant_tokens_schedule = "constant"
            draft.generation_config.assistant_confidence_threshold = conf

            def ours(draft=draft, ids=ids, mask=mask, eos=eos, pad=pad, reference=reference, conf=conf):
                return _checked(lambda: speculative_generate(target, draft, ids, mask, max_new_tokens=n_new,
                                                             num_draft_tokens=k, eos_token_id=eos, pad_token_id=pad,
                                                             draft_confidence_threshold=conf).sequences,
                                reference, "lmfuse")

            def hf_assisted(draft=draft, ids=ids, hf_kw=hf_kw, width=width, pad=pad, reference=reference):
                try:
                    run = lambda: _padded(target.generate(ids, assistant_model=draft, **hf_kw), width, pad)  # noqa: E731
                    return _checked(run, reference, "hf-assisted")
                except ValueError as e:  # transformers: assisted generation needs batch size 1
                    raise ProviderUnavailable(f"transformers refuses: {str(e)[:120]}") from e

            providers = [Provider("lmfuse-speculative", ours), Provider("hf-assisted", hf_assisted),
                         Provider("hf-greedy", hf_greedy)]
            out.append(Case(OP, f"B={batch},draft=L{layers},k={k},conf={conf},new={n_new}", torch.float32, device,
                            providers, baseline="hf-assisted" if batch == 1 else "hf-greedy",
                            target="lmfuse-speculative", modes=("fwd",),
                            note="whole generate call; shared CPU: see p20/p80"))

        def ours_lookup(ids=ids, mask=mask, eos=eos, pad=pad, reference=reference):
            return _checked(lambda: speculative_generate(target, PromptLookupDrafter(), ids, mask,
                                                         max_new_tokens=n_new, num_draft_tokens=k, eos_token_id=eos,
                                                         pad_token_id=pad).sequences, reference, "lmfuse-lookup")

        def hf_lookup(ids=ids, hf_kw=hf_kw, width=width, pad=pad, reference=reference):
            try:
                run = lambda: _padded(target.generate(ids, prompt_lookup_num_tokens=k, **hf_kw), width, pad)  # noqa: E731
                return _checked(run, reference, "hf-prompt-lookup")
            except ValueError as e:
                raise ProviderUnavailable(f"transformers refuses: {str(e)[:120]}") from e

        out.append(Case(OP, f"B={batch},draft=lookup,k={k},new={n_new}", torch.float32, device,
                        [Provider("lmfuse-prompt-lookup", ours_lookup), Provider("hf-prompt-lookup", hf_lookup),
                         Provider("hf-greedy", hf_greedy)],
                        baseline="hf-prompt-lookup" if batch == 1 else "hf-greedy", target="lmfuse-prompt-lookup",
                        modes=("fwd",), note="whole generate call; shared CPU: see p20/p80"))
    return out
