"""A local Hugging Face causal LM as a PROTEUS backend, with constrained decoding so that even
the bundled SmolLM2-135M can only emit schema-valid replies.

A tiny model cannot write reliable free JSON, so for a schema the reply is *built by code*: the
JSON skeleton (braces, keys, punctuation) is written by walking the schema, and every choice the
schema leaves open is made by the model among the values the schema allows. A closed choice
(``enum``, ``const`` alternatives of a ``oneOf``, booleans, list items drawn from an enum) is
decided by exhaustive constrained decoding: each allowed continuation is scored by its total
log-probability after the JSON written so far (one forward over the shared prefix, whose KV cache
is reused by all candidates), optionally calibrated by pointwise mutual information (minus its
log-probability after a neutral prompt), and the best one is written. Free strings (a rationale)
are decoded through lmfuse's own generation loop (:func:`lmfuse.collab.plain_generate`, which
samples with ``lmfuse.ops.collab_decode_step``) and JSON-escaped. Numbers without an enum take the
schema's default (or minimum). The result is valid by construction.

Without a schema, ``chat`` decodes free text through the same loop.
"""

from __future__ import annotations

import copy
import json

from .backend import check_messages, validate_json

NEUTRAL_PROMPT = "Goal: (unspecified)"


class LocalHFBackend:
    """A tiny local model ranks options; it does not reword hypotheses (``writes_text`` is False:
    the templates are better than its free text).

    ``model``/``tokenizer``: a causal LM and its tokenizer; default: the bundled
    SmolLM2-135M-Instruct (``lmfuse.models.load_bundled_model``), loaded on first use.
    ``calibrate``: PMI-calibrate closed choices among more than two options (default True).
    ``rationale_tokens``: how many tokens a free string may take (default 24)."""

    def __init__(self, model=None, tokenizer=None, *, calibrate: bool = True, rationale_tokens: int = 24):
        if (model is None) != (tokenizer is None):
            raise ValueError("pass both model and tokenizer, or neither (to load the bundled model)")
        if not (isinstance(rationale_tokens, int) and rationale_tokens >= 0):
            raise ValueError(f"rationale_tokens must be an int >= 0, got {rationale_tokens!r}")
        self._model, self._tok = model, tokenizer
        self.calibrate, self.rationale_tokens = bool(calibrate), rationale_tokens
        self.name = "local:" + (getattr(getattr(model, "config", None), "_name_or_path", "") or "bundled")
        self.writes_text = False
        self.decisions = 0

    # ------------------------------------------------------------------ model access
    def _load(self):
        if self._model is None:
            from lmfuse.models import load_bundled_model

            self._model, self._tok = load_bundled_model()
            self.name = "local:SmolLM2-135M-Instruct"
        return self._model, self._tok

    def _prompt_text(self, messages: list[dict]) -> str:
        _, tok = self._load()
        if getattr(tok, "chat_template", None):
            return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "

    def _ids(self, text: str) -> list[int]:
        _, tok = self._load()
        return tok(text, add_special_tokens=False)["input_ids"]

    def _continuation_logprobs(self, prefix_ids: list[int], conts: list[list[int]]) -> list[float]:
        """Sum of log p(continuation | prefix) for each continuation; the prefix is run once and
        its KV cache shared by all candidates (right-padded into one batch)."""
        import torch

        model, tok = self._load()
        dev = next(model.parameters()).device
        with torch.no_grad():
            pre = torch.tensor([prefix_ids], device=dev)
            out = model(input_ids=pre, use_cache=True)
            first = torch.log_softmax(out.logits[0, -1].float(), -1)
            K, L, P = len(conts), max(len(c) for c in conts), len(prefix_ids)
            scores = [float(first[c[0]]) for c in conts]
            if L > 1:
                cache = copy.deepcopy(out.past_key_values)
                cache.batch_repeat_interleave(K)
                pad = tok.pad_token_id if tok.pad_token_id is not None else 0
                ids = torch.full((K, L), pad, dtype=torch.long, device=dev)
                valid = torch.zeros(K, L, dtype=torch.bool, device=dev)
                for i, c in enumerate(conts):
                    ids[i, :len(c)] = torch.tensor(c)
                    valid[i, :len(c)] = True
                mask = torch.cat([torch.ones(K, P, dtype=torch.long, device=dev), valid.long()], dim=1)
                pos = (P + torch.arange(L, device=dev))[None].expand(K, L)
                logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                               use_cache=True).logits.float()
                lp = torch.log_softmax(logits[:, :-1], -1)
                for i, c in enumerate(conts):
                    if len(c) > 1:
                        scores[i] += float(lp[i, torch.arange(len(c) - 1), torch.tensor(c[1:])].sum())
        return scores

    def score_choices(self, prompt: str, choices: list[str], *, calibrate: bool | None = None,
                      neutral: str = NEUTRAL_PROMPT, suffix: str = "") -> list[float]:
        """One score per choice (higher is better): log p(choice | prompt + suffix), minus
        log p(choice | neutral + suffix) when ``calibrate`` (default: the backend's setting).
        ``prompt`` is a user message; ``suffix`` is text the assistant has already written."""
        if not choices or not all(isinstance(c, str) and c for c in choices):
            raise ValueError("choices must be a non-empty list of non-empty strings")
        calibrate = self.calibrate if calibrate is None else calibrate
        conts = [self._ids(c) for c in choices]
        text = self._prompt_text([{"role": "user", "content": prompt}]) + suffix
        scores = self._continuation_logprobs(self._ids(text), conts)
        if calibrate:
            base_text = self._prompt_text([{"role": "user", "content": neutral}]) + suffix
            base = self._continuation_logprobs(self._ids(base_text), conts)
            scores = [s - b for s, b in zip(scores, base)]
        self.decisions += 1
        return scores

    # ------------------------------------------------------------------ constrained JSON
    def _choose(self, prefix: str, neutral_prefix: str, texts: list[str]) -> int:
        if len(texts) == 1:
            return 0
        conts = [self._ids(t) for t in texts]
        scores = self._continuation_logprobs(self._ids(prefix), conts)
        if self.calibrate and len(texts) > 2:
            base = self._continuation_logprobs(self._ids(neutral_prefix), conts)
            scores = [s - b for s, b in zip(scores, base)]
        self.decisions += 1
        return max(range(len(texts)), key=lambda i: (scores[i], -i))

    def _free_text(self, prefix: str, max_chars: int) -> str:
        import torch

        from lmfuse.collab import plain_generate

        model, tok = self._load()
        if self.rationale_tokens == 0:
            return ""
        ids = torch.tensor([self._ids(prefix)])
        out = plain_generate(model, ids, max_new_tokens=self.rationale_tokens, temperature=0.0)
        new = out.sequences[0, ids.shape[1]:ids.shape[1] + int(out.new_tokens[0])]
        text = tok.decode(new, skip_special_tokens=True)
        text = text.split('"')[0].split("\n")[0].strip()
        return text[:max_chars]

    def _fill(self, schema: dict, root: dict, prefix: str, neutral: str):
        """A value for ``schema``; ``prefix`` is the prompt plus the JSON written so far."""
        from .backend import _resolve

        schema = _resolve(schema, root)
        for key in ("oneOf", "anyOf"):
            if key in schema:
                alts = [_resolve(a, root) for a in schema[key]]
                labels = [_const_label(a) for a in alts]
                if all(lab is not None for lab in labels) and len(alts) > 1:
                    key_name = labels[0][0]
                    head = "{" + json.dumps(key_name) + ": "
                    i = self._choose(prefix + head, neutral + head, [json.dumps(lab[1]) for lab in labels])
                else:
                    i = 0
                return self._fill(alts[i], root, prefix, neutral)
        if "const" in schema:
            return schema["const"]
        if "enum" in schema:
            opts = list(schema["enum"])
            return opts[self._choose(prefix, neutral, [json.dumps(o) for o in opts])]
        t = schema.get("type")
        t = t[0] if isinstance(t, list) else t
        if t == "object" or "properties" in schema:
            props = schema.get("properties", {})
            keys = [k for k in props if k in set(schema.get("required", []))]
            obj, text = {}, "{"
            for j, k in enumerate(keys):
                text += ("" if j == 0 else ", ") + json.dumps(k) + ": "
                obj[k] = self._fill(props[k], root, prefix + text, neutral + text)
                text += json.dumps(obj[k])
            return obj
        if t == "boolean":
            return [True, False][self._choose(prefix, neutral, ["true", "false"])]
        if t == "array":
            items = _resolve(schema.get("items", {}), root)
            need = int(schema.get("minItems", 0))
            if need == 0:
                return []
            opts = list(items.get("enum", []))
            chosen = []
            while len(chosen) < need and opts:
                i = self._choose(prefix + json.dumps(chosen)[:-1], neutral, [json.dumps(o) for o in opts])
                chosen.append(opts.pop(i))
            if len(chosen) < need:
                raise ValueError("cannot fill an array of free values under constrained decoding")
            return chosen
        if t in ("number", "integer"):
            value = schema.get("default", schema.get("minimum", 0))
            return int(value) if t == "integer" else float(value)
        if t == "string":
            if "default" in schema:
                return schema["default"]
            return self._free_text(prefix + '"', int(schema.get("maxLength", 200)))
        if t == "null":
            return None
        raise ValueError(f"schema node not supported by constrained decoding: {json.dumps(schema)[:120]}")

    def chat(self, messages: list[dict], *, schema: dict | None = None, max_tokens: int = 512,
             temperature: float = 0.0, seed: int | None = None) -> str:
        """Free text decoded by :func:`lmfuse.collab.plain_generate` without ``schema``; with one,
        a JSON text built by constrained decoding (valid under ``schema`` by construction)."""
        import torch

        from lmfuse.collab import plain_generate

        msgs = check_messages(messages)
        prompt = self._prompt_text(msgs)
        if schema is None:
            model, tok = self._load()
            ids = torch.tensor([self._ids(prompt)])
            gen = torch.Generator().manual_seed(int(seed or 0))
            out = plain_generate(model, ids, max_new_tokens=int(max_tokens), temperature=float(temperature),
                                 generator=gen)
            new = out.sequences[0, ids.shape[1]:ids.shape[1] + int(out.new_tokens[0])]
            return tok.decode(new, skip_special_tokens=True)
        neutral = self._prompt_text([{"role": "user", "content": NEUTRAL_PROMPT}])
        value = self._fill(schema, schema, prompt, neutral)
        errs = validate_json(value, schema)
        if errs:  # would be a bug in _fill: never hand an invalid reply on
            raise AssertionError(f"constrained decoding built an invalid value: {errs[:3]}")
        return json.dumps(value)


def _const_label(schema: dict):
    """``(key, value)`` of the first property of an object schema fixed by ``const`` (or a
    one-value enum), e.g. ``("tool", "differential_abundance")``; None if there is none."""
    for k, p in schema.get("properties", {}).items():
        if "const" in p:
            return k, p["const"]
        if isinstance(p.get("enum"), list) and len(p["enum"]) == 1:
            return k, p["enum"][0]
    return None
