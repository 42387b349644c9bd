"""``UltraFuser``: E specialist causal LMs sharing one tokenizer, blended token by token.

For each response token ``n`` every expert ``e`` gives its final hidden state ``h_e[n]`` (under
its own prompt template), a shared :class:`lmfuse.modules.TokenGate` turns those into weights
``w[n, :]`` (softmax over experts), and the next-token distribution is the softmax of the blended
logits ``z[n] = Σ_e w[n, e] · W_e h_e[n]`` over the common vocabulary. The training loss is the
cross-entropy of ``z`` on the response tokens, computed by
:func:`lmfuse.ops.expert_blend_cross_entropy` (the E × N × V logits are never built).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from ..modules.token_gate import TokenGate
from .data import IGNORE, encode_examples, split_example

__all__ = ["UltraFuser", "FusionOutput", "GateWeights", "TokenizerMismatchError"]


class TokenizerMismatchError(ValueError):
    """The experts (or the tokenizers given for them) do not share one vocabulary."""


@dataclass
class FusionOutput:
    """``loss``: fp32 (scalar, or ``[N]`` for ``reduction="none"``); ``gate [N, E]`` fp32: the
    blend weight of each response token; ``target [N]`` int64; ``n_tokens``: N."""

    loss: torch.Tensor
    gate: torch.Tensor
    target: torch.Tensor
    n_tokens: int


@dataclass
class GateWeights:
    """Per-token gate weights of a batch: ``weights[b]`` ``[n_b, E]`` fp32 for example ``b``'s
    response tokens ``tokens[b]`` (``[n_b]`` int64), and the flat ``[N, E]`` / ``[N]`` forms."""

    weights: list
    tokens: list
    flat: torch.Tensor
    flat_tokens: torch.Tensor


def _vocab_key(tokenizer) -> tuple:
    specials = tuple((k, getattr(tokenizer, k, None)) for k in ("bos_token_id", "eos_token_id", "unk_token_id"))
    return tuple(sorted(tokenizer.get_vocab().items())), specials


def check_shared_tokenizer(tokenizers: Sequence) -> None:
    """``TokenizerMismatchError`` naming the first expert whose tokenizer maps some token (or a
    special token) differently from expert 0's."""
    vocab0, special0 = _vocab_key(tokenizers[0])
    v0 = dict(vocab0)
    for e, tok in enumerate(tokenizers[1:], start=1):
        vocab, special = _vocab_key(tok)
        if vocab != vocab0:
            v = dict(vocab)
            diff = sorted(set(v.items()) ^ set(v0.items()), key=str)[:3]
            raise TokenizerMismatchError(
                f"tokenizer: expert {e}'s tokenizer differs from expert 0's ({len(v)} vs {len(v0)} tokens; e.g. "
                f"{diff}); UltraFuser blends logits token by token, so all experts need one vocabulary")
        if special != special0:
            raise TokenizerMismatchError(f"tokenizer: expert {e}'s special tokens {dict(special)} differ from "
                                         f"expert 0's {dict(special0)}")


class UltraFuser(nn.Module):
    """Token-level fusion of E Hugging Face causal LMs (UltraFuser).

    Args:
        experts: a list of E causal LMs (``…ForCausalLM``), or a dict ``name → model`` (names are
            used by the analysis; default ``expert0 …``).
        tokenizer: the shared tokenizer, or a list of E tokenizers (one per expert), which must
            then be identical (same token → id map and special tokens; ``TokenizerMismatchError``
            otherwise). Every expert's embedding and head need at least ``len(tokenizer)`` rows.
        templates: one prompt template per expert (a string with ``{prompt}``, a callable
            ``messages -> str``, or None for the tokenizer's chat template); default all None.
        vocab_size: the common vocabulary (rows of each head used; default the smallest head's
            vocabulary, e.g. 32000 for heads of 32000 / 32016 / 32001 rows).
        gate: a :class:`TokenGate` (default: a fresh one, ``hidden_size`` of expert 0, inner 512,
            projections for experts of another hidden size; all experts start at weight 1/E).

    The experts' output heads must be plain linear layers with no logit scaling or softcap.
    """

    def __init__(self, experts, tokenizer, *, templates=None, vocab_size: Optional[int] = None,
                 gate: Optional[TokenGate] = None):
        super().__init__()
        from ..losses import output_head

        if isinstance(experts, dict):
            names, models = [str(k) for k in experts], list(experts.values())
        elif isinstance(experts, (list, tuple)):
            models = list(experts)
            names = [f"expert{e}" for e in range(len(models))]
        else:
            raise TypeError(f"experts: expected a list or dict of causal LMs, got {type(experts).__name__}")
        if not models:
            raise ValueError("experts: expected at least one expert")
        for e, m in enumerate(models):
            if not isinstance(m, nn.Module):
                raise TypeError(f"experts[{e}]: expected a Hugging Face causal LM, got {type(m).__name__}")
        E = len(models)
        self.expert_names = names
        self.experts = nn.ModuleList(models)
        toks = list(tokenizer) if isinstance(tokenizer, (list, tuple)) else [tokenizer] * E
        if len(toks) != E:
            raise ValueError(f"tokenizer: expected one tokenizer or {E} (one per expert), got {len(toks)}")
        check_shared_tokenizer(toks)
        self.tokenizer = toks[0]
        if templates is None:
            templates = [None] * E
        templates = list(templates)
        if len(templates) != E:
            raise ValueError(f"templates: expected {E} templates (one per expert), got {len(templates)}")
        for e, t in enumerate(templates):
            if not (t is None or callable(t) or (isinstance(t, str) and "{prompt}" in t)):
                raise ValueError(f"templates[{e}]: expected None, a callable or a string containing '{{prompt}}', got {t!r}")
        self.templates = templates
        heads = [output_head(m) for m in models]
        for e, h in enumerate(heads):
            if h.logit_scale != 1.0 or h.softcap is not None:
                raise NotImplementedError(f"experts[{e}]: logit scale {h.logit_scale} / softcap {h.softcap} are not "
                                          "supported by the blended loss")
        smallest = min(h.vocab_size for h in heads)
        if vocab_size is None:
            vocab_size = smallest
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 1 <= vocab_size <= smallest:
            raise ValueError(f"vocab_size: expected an int in [1, {smallest}] (the smallest expert vocabulary), "
                             f"got {vocab_size!r}")
        n_tok = len(self.tokenizer)
        for e, m in enumerate(models):
            rows = m.get_input_embeddings().weight.shape[0]
            if rows < n_tok:
                raise TokenizerMismatchError(f"experts[{e}] embeds {rows} tokens but the tokenizer has {n_tok}: "
                                             "this expert was not trained with this tokenizer")
        if n_tok > vocab_size:
            raise TokenizerMismatchError(f"tokenizer: {n_tok} tokens, but the common vocabulary is {vocab_size} "
                                         "(vocab_size): tokens past it could never be predicted")
        self.vocab_size = vocab_size
        sizes = [int(h.weight.shape[1]) for h in heads]
        if gate is None:
            p = next(models[0].parameters())
            gate = TokenGate(sizes[0], E, expert_hidden_sizes=sizes, device=p.device)
        if not isinstance(gate, TokenGate):
            raise TypeError(f"gate: expected a lmfuse.modules.TokenGate, got {type(gate).__name__}")
        if gate.num_experts != E or list(gate.expert_hidden_sizes) != sizes:
            raise ValueError(f"gate: built for {gate.num_experts} experts of hidden sizes "
                             f"{list(gate.expert_hidden_sizes)}, the experts have {sizes}")
        self.gate = gate

    @property
    def num_experts(self) -> int:
        return len(self.experts)

    # ------------------------------------------------------------------------------ inputs

    def encode(self, examples: Sequence, *, add_eos: bool = True, max_length: Optional[int] = None) -> dict:
        """Per-expert ``input_ids`` / ``attention_mask`` / ``labels`` (lists of E ``[B, T_e]``
        tensors on the experts' device) for examples (see :mod:`lmfuse.fusion.data`)."""
        enc = encode_examples(self.tokenizer, self.templates, examples, add_eos=add_eos, max_length=max_length)
        dev = self.gate.scorer[0].weight.device
        return {k: [t.to(dev) for t in v] for k, v in enc.items()}

    def _check_batch(self, input_ids, attention_mask, labels) -> None:
        E = self.num_experts
        for name, v in (("input_ids", input_ids), ("attention_mask", attention_mask), ("labels", labels)):
            if v is None and name == "attention_mask":
                continue
            if not isinstance(v, (list, tuple)) or len(v) != E:
                raise ValueError(f"{name}: expected a list of {E} tensors [B, T_e] (one per expert), got "
                                 f"{type(v).__name__}{'' if not isinstance(v, (list, tuple)) else f' of {len(v)}'}")
        for e in range(E):
            if input_ids[e].dim() != 2 or labels[e].shape != input_ids[e].shape:
                raise ValueError(f"labels[{e}]: expected shape {tuple(input_ids[e].shape)} (input_ids[{e}]), "
                                 f"got {tuple(labels[e].shape)}")

    def response_hiddens(self, input_ids, attention_mask, labels) -> tuple[list, torch.Tensor]:
        """``(E × [N, H_e] hidden states at the positions that predict a response token,
        target [N])``; ``ValueError`` when the experts' response tokens do not line up."""
        from ..losses import output_head, run_backbone

        self._check_batch(input_ids, attention_mask, labels)
        hiddens, target = [], None
        for e, model in enumerate(self.experts):
            head = output_head(model)
            trainable = any(p.requires_grad for p in model.parameters())
            with torch.set_grad_enabled(torch.is_grad_enabled() and trainable):
                mask = None if attention_mask is None else attention_mask[e]
                hidden = run_backbone(head.backbone, input_ids[e], mask)
            nxt = labels[e][:, 1:].to(hidden.device)
            sel = nxt != IGNORE
            t = nxt[sel]
            if target is None:
                target = t
            elif not torch.equal(t, target):
                raise ValueError(f"labels[{e}]: expert {e}'s response tokens ({t.numel()}) do not match expert 0's "
                                 f"({target.numel()}); each row needs the same response tokens in every expert")
            hiddens.append(hidden[:, :-1][sel])
        return hiddens, target

    def heads(self) -> tuple[list, list]:
        """``(E weights [V_e, H_e], E biases or None)`` of the experts' output heads."""
        from ..losses import output_head

        hs = [output_head(m) for m in self.experts]
        return [h.weight for h in hs], [h.bias for h in hs]

    # ------------------------------------------------------------------------------ forward

    def forward(self, input_ids, attention_mask=None, labels=None, *, reduction: str = "mean",
                label_smoothing: float = 0.0, blend: str = "logits") -> FusionOutput:
        """The blended cross-entropy on the response tokens.

        ``input_ids`` / ``attention_mask`` / ``labels``: lists of E ``[B, T_e]`` int64 tensors
        (:meth:`encode`; right padding). Returns :class:`FusionOutput` (``loss`` fp32, the mean
        over the N response tokens by default). Experts with no trainable parameter run under
        ``no_grad`` (stage 1 keeps no activations of theirs).
        """
        from lmfuse import ops

        if labels is None:
            raise ValueError("labels: expected a list of E [B, T_e] tensors marking the response (see encode())")
        hiddens, target = self.response_hiddens(input_ids, attention_mask, labels)
        if target.numel() == 0:
            raise ValueError("labels: the batch has no response token")
        gate = self.gate(hiddens)
        weights, biases = self.heads()
        hs = [h.to(w.dtype) for h, w in zip(hiddens, weights)]
        loss = ops.expert_blend_cross_entropy(hs, weights, gate, target, biases=biases if any(
            b is not None for b in biases) else None, blend=blend, vocab_size=self.vocab_size,
            ignore_index=IGNORE, reduction=reduction, label_smoothing=label_smoothing)
        return FusionOutput(loss, gate, target, int(target.numel()))

    @torch.no_grad()
    def gate_weights(self, examples=None, **batch) -> GateWeights:
        """Gate weights of every response token: pass ``examples`` (encoded here) or an encoded
        batch (``input_ids=``, ``attention_mask=``, ``labels=``)."""
        if examples is not None:
            batch = self.encode(examples)
        labels = batch["labels"]
        hiddens, target = self.response_hiddens(batch["input_ids"], batch.get("attention_mask"), labels)
        w = self.gate(hiddens).float().cpu()
        counts = (labels[0][:, 1:] != IGNORE).sum(1).tolist()
        return GateWeights(list(w.split(counts)), list(target.cpu().split(counts)), w, target.cpu())

    @torch.no_grad()
    def blended_logits(self, hiddens: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z [N, V] fp32, gate [N, E])`` from the experts' hidden states ``E × [N, H_e]``
        (materialises the logits: for analysis and tests, not for training)."""
        weights, biases = self.heads()
        gate = self.gate(hiddens)
        z = 0
        for e, (h, w, b) in enumerate(zip(hiddens, weights, biases)):
            o = h.to(w.dtype) @ w[:self.vocab_size].T
            if b is not None:
                o = o + b[:self.vocab_size]
            z = z + gate[:, e:e + 1].to(torch.float32) * o.float()
        return z, gate

    def generate(self, prompts, **kwargs):
        """Batched blended decoding; see :func:`lmfuse.fusion.generate.fused_generate`."""
        from .generate import fused_generate

        return fused_generate(self, prompts, **kwargs)

    def save_pretrained(self, directory: str) -> str:
        """Write the gate, the experts' ``lmfuse.delta`` deltas and the experts' fingerprints;
        see :func:`lmfuse.fusion.io.save_fuser`."""
        from .io import save_fuser

        return save_fuser(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str, experts, tokenizer, **kwargs) -> "UltraFuser":
        """Rebuild a saved fuser on ``experts`` (refused when they are not the saved ones); see
        :func:`lmfuse.fusion.io.load_fuser`."""
        from .io import load_fuser

        return load_fuser(directory, experts, tokenizer, **kwargs)

    def prompts_of(self, examples: Sequence) -> list:
        """The prompt messages of examples (their responses dropped), for :meth:`generate`."""
        return [split_example(x)[0] for x in examples]
