"""Examples, per-expert templates, response-token alignment, the collator and the balanced sampler.

An *example* is a dict with either ``"messages"`` (chat messages ``{"role", "content"}``, the last
one the assistant's response) or ``"prompt"`` and ``"response"`` strings, and optionally a
``"domain"`` label (for :class:`DomainBalancedSampler` and the analysis).

Each expert sees the example wrapped in its own template, so prompt lengths differ per expert;
the response is tokenized once and appended to every expert's prompt, so the response tokens are
the same, in the same order, for every expert. Labels follow the Hugging Face convention
(``-100`` outside the response), so position ``t`` of expert ``e`` predicts ``labels_e[t + 1]``
and gathering the positions whose next label is not ``-100`` gives the same ``N`` rows for every
expert.
"""

from __future__ import annotations

from typing import Callable, Iterator, Optional, Sequence, Union

import torch

IGNORE = -100
Template = Union[str, Callable[[list], str], None]

__all__ = ["DomainBalancedSampler", "FusionCollator", "split_example", "render_prompt", "encode_examples",
           "IGNORE"]


def split_example(example) -> tuple[list, Optional[str]]:
    """``(prompt messages, response text or None)`` of an example (a dict, a message list or a
    plain prompt string; the response is None when the last message is not the assistant's)."""
    if isinstance(example, str):
        return [{"role": "user", "content": example}], None
    if isinstance(example, dict) and "messages" not in example and "prompt" in example:
        msgs = [{"role": "user", "content": example["prompt"]}]
        return msgs, example.get("response")
    msgs = example["messages"] if isinstance(example, dict) else example
    if not isinstance(msgs, (list, tuple)) or not msgs or not all(isinstance(m, dict) and "role" in m
                                                                   and "content" in m for m in msgs):
        raise ValueError("example: expected {'messages': [{'role', 'content'}, ...]}, {'prompt', 'response'}, a "
                         f"message list or a prompt string, got {type(example).__name__}")
    msgs = list(msgs)
    if msgs[-1]["role"] == "assistant":
        return msgs[:-1], msgs[-1]["content"]
    return msgs, None


def render_prompt(tokenizer, template: Template, messages: list) -> tuple[str, bool]:
    """The prompt text an expert sees, and whether the tokenizer should add its special tokens.

    ``template``: a string with ``{prompt}`` (filled with the user message; a system message, if
    any, goes before it on its own line), a callable ``messages -> str``, or None: the tokenizer's
    chat template with the generation prompt (special tokens come from the template), or
    ``"{prompt}"`` when the tokenizer has none."""
    if callable(template):
        return str(template(messages)), True
    if template is None:
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), False
        template = "{prompt}"
    users = [m for m in messages if m["role"] == "user"]
    others = [m for m in messages if m["role"] not in ("user", "system")]
    if len(users) != 1 or others:
        raise ValueError("a string template renders one user message (and an optional system message); "
                         f"got roles {[m['role'] for m in messages]}: pass a callable template for multi-turn chats")
    system = "".join(m["content"] + "\n" for m in messages if m["role"] == "system")
    return system + template.format(prompt=users[0]["content"]), True


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def prompt_ids(tokenizer, templates: Sequence[Template], messages: list) -> list[list[int]]:
    """Each expert's prompt token ids for ``messages`` (what generation starts from)."""
    out = []
    for t in templates:
        text, special = render_prompt(tokenizer, t, messages)
        out.append(_ids(tokenizer, text, special))
    return out


def encode_examples(tokenizer, templates: Sequence[Template], examples: Sequence, *, add_eos: bool = True,
                    max_length: Optional[int] = None, pad_token_id: Optional[int] = None) -> dict:
    """Tokenize ``examples`` for E experts (E = ``len(templates)``).

    Returns ``{"input_ids": E × [B, T_e] int64, "attention_mask": E × [B, T_e] int64,
    "labels": E × [B, T_e] int64}`` (right padding; labels ``-100`` outside the response). The
    response gets the tokenizer's EOS appended (``add_eos``). ``max_length`` cuts the response so
    that every expert's sequence fits (the same cut for all experts, so rows stay aligned); an
    example whose prompt alone reaches ``max_length`` in some expert raises ``ValueError``.
    """
    if not examples:
        raise ValueError("examples: expected at least one example")
    E = len(templates)
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = pad_token_id if pad_token_id is not None else (tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                                         else (eos if eos is not None else 0))
    rows = [[] for _ in range(E)]  # per expert: (ids, n_prompt)
    for i, ex in enumerate(examples):
        messages, response = split_example(ex)
        if response is None:
            raise ValueError(f"examples[{i}]: no response (the last message must be the assistant's, or give "
                             "'response')")
        resp = _ids(tokenizer, response, False) + ([eos] if add_eos and eos is not None else [])
        prompts = prompt_ids(tokenizer, templates, messages)
        if max_length is not None:
            room = min(max_length - len(p) for p in prompts)
            if room < 1:
                raise ValueError(f"examples[{i}]: a prompt is {max(len(p) for p in prompts)} tokens, no room for a "
                                 f"response within max_length={max_length}")
            resp = resp[:room]
        if not resp:
            raise ValueError(f"examples[{i}]: the response has no tokens")
        for e in range(E):
            rows[e].append((prompts[e] + resp, len(prompts[e])))
    out = {"input_ids": [], "attention_mask": [], "labels": []}
    for e in range(E):
        T = max(len(ids) for ids, _ in rows[e])
        ids = torch.full((len(examples), T), pad, dtype=torch.long)
        mask = torch.zeros(len(examples), T, dtype=torch.long)
        labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
        for b, (seq, n_prompt) in enumerate(rows[e]):
            ids[b, :len(seq)] = torch.tensor(seq)
            mask[b, :len(seq)] = 1
            labels[b, n_prompt:len(seq)] = torch.tensor(seq[n_prompt:])
        out["input_ids"].append(ids)
        out["attention_mask"].append(mask)
        out["labels"].append(labels)
    return out


class FusionCollator:
    """A ``data_collator`` for :class:`lmfuse.fusion.UltraFuserTrainer`: a list of examples →
    :func:`encode_examples` of the fuser's tokenizer and templates (other keys are dropped)."""

    def __init__(self, fuser, *, add_eos: bool = True, max_length: Optional[int] = None):
        self.fuser, self.add_eos, self.max_length = fuser, add_eos, max_length

    def __call__(self, examples: list) -> dict:
        return self.fuser.encode(examples, add_eos=self.add_eos, max_length=self.max_length)


class DomainBalancedSampler(torch.utils.data.Sampler):
    """Indices in batches of ``batch_size`` holding the same number of examples of each domain.

    ``domains``: one label per dataset row. Each batch takes ``batch_size / D`` examples of each
    of the D domains, drawn without replacement from a fresh shuffle of that domain every epoch
    (grouped by domain inside a batch: order within a batch does not matter for a loss).
    ``num_batches`` (default: as many as the smallest domain allows) batches per epoch.
    ``ValueError`` when ``batch_size`` is not a multiple of D, or a domain has too few examples
    for ``num_batches`` batches (it would run out), naming the domain. ``seed``: the shuffles are
    reproducible (epoch ``k`` uses ``seed + k``).
    """

    def __init__(self, domains: Sequence, batch_size: int, *, num_batches: Optional[int] = None, seed: int = 0):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive int, got {batch_size!r}")
        domains = list(domains)
        if not domains:
            raise ValueError("domains: expected one label per example, got none")
        self.names = sorted(set(domains), key=str)
        D = len(self.names)
        if batch_size % D:
            raise ValueError(f"batch_size: {batch_size} is not a multiple of the number of domains ({D}: "
                             f"{self.names}); balanced batches need batch_size = k × {D}")
        self.batch_size, self.per_domain = batch_size, batch_size // D
        self.pools = {d: [i for i, x in enumerate(domains) if x == d] for d in self.names}
        most = min(len(p) // self.per_domain for p in self.pools.values())
        if num_batches is None:
            num_batches = max(most, 1)  # a domain smaller than one batch share fails below
        if isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1:
            raise ValueError(f"num_batches: expected a positive int, got {num_batches!r}")
        for d, pool in self.pools.items():
            if len(pool) < num_batches * self.per_domain:
                raise ValueError(f"domain {d!r} runs out: {num_batches} batches × {self.per_domain} examples per "
                                 f"domain need {num_batches * self.per_domain}, it has {len(pool)}")
        self.num_batches, self.seed, self.epoch = num_batches, int(seed), 0

    def __len__(self) -> int:
        return self.num_batches * self.batch_size

    def batches(self) -> Iterator[list[int]]:
        """One epoch as a list of index batches (advances the epoch)."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        order = {d: [pool[j] for j in torch.randperm(len(pool), generator=g).tolist()] for d, pool in self.pools.items()}
        k = self.per_domain
        for b in range(self.num_batches):
            yield [i for d in self.names for i in order[d][b * k:(b + 1) * k]]

    def __iter__(self) -> Iterator[int]:
        for batch in self.batches():
            yield from batch
