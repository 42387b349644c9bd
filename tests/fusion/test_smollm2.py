"""End-to-end on the bundled SmolLM2-135M: three LoRA specialists made by short fine-tunes (two steps each) on
different text (Austen prose, code-like lines, arithmetic), fused, two stage-1 steps and one stage-2 step (LoRA), and
batched greedy fused generation equal to a step-by-step eager reference."""

import copy
import os

import pytest
import torch

from lmfuse import delta
from lmfuse.fusion import UltraFuser, UltraFuserTrainer

AUSTEN = "/work/shared/data/austen/austen.txt"
DOMAINS = ("prose", "code", "math")
# short prompt templates, one per expert (the chat template's system prompt would triple the length)
TEMPLATES = ["User: {prompt}\nAssistant:", "[INST] {prompt} [/INST]", "### Instruction:\n{prompt}\n### Response:\n"]
# a step whose top-2 blended logits are closer than this is a near tie: fp32 summation order
# (batched + cached vs one row from scratch) may pick either, so the comparison stops there
TIE_MARGIN = 1e-3


def _austen_examples(n, g):
    with open(AUSTEN, encoding="utf-8") as f:
        text = f.read()[20000:200000]
    out = []
    for _ in range(n):
        i = int(torch.randint(0, len(text) - 400, (1,), generator=g))
        words = text[i:i + 400].split()[1:15]
        out.append({"prompt": "Continue: " + " ".join(words[:8]), "response": " ".join(words[8:]), "domain": "prose"})
    return out


def _code_examples(n, g):
    names = ["total", "count", "items", "value", "index"]
    out = []
    for _ in range(n):
        a, b = (names[int(i)] for i in torch.randint(0, len(names), (2,), generator=g))
        k = int(torch.randint(1, 9, (1,), generator=g))
        out.append({"prompt": f"def update({a}, {b}):", "response": f"    {a} = {a} + {b} * {k}\n    return {a}",
                    "domain": "code"})
    return out


def _math_examples(n, g):
    out = []
    for _ in range(n):
        a, b = (int(i) for i in torch.randint(10, 99, (2,), generator=g))
        out.append({"prompt": f"What is {a} + {b}?", "response": f"{a} + {b} = {a + b}.", "domain": "math"})
    return out


def _args(tmp, steps, batch=3, lr=1e-3):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp), max_steps=steps, per_device_train_batch_size=batch,
                             learning_rate=lr, lr_scheduler_type="constant", save_strategy="no", report_to=[],
                             disable_tqdm=True, use_cpu=True, logging_strategy="no")


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    if not os.path.isfile(AUSTEN):
        pytest.skip(f"{AUSTEN} is absent")
    pytest.importorskip("gguf")
    from lmfuse.fusion.data import encode_examples
    from lmfuse.models import load_bundled_model

    try:
        base, tok = load_bundled_model()
    except FileNotFoundError as e:
        pytest.skip(f"bundled model unavailable: {e}")
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**30, ())))
    data = {"prose": _austen_examples(6, g), "code": _code_examples(6, g), "math": _math_examples(6, g)}
    experts = []
    for e, d in enumerate(DOMAINS):  # a specialist: the base model + a LoRA delta fine-tuned on its domain
        m = copy.deepcopy(base)
        delta.attach(m, delta.LoRAConfig(r=4, targets=("q_proj", "v_proj")), name="fusion_lora")
        delta.freeze(m)
        opt = torch.optim.AdamW(delta.delta_parameters(m), lr=2e-3)
        m.train()
        for step in range(2):
            enc = encode_examples(tok, [TEMPLATES[e]], data[d][2 * step:2 * step + 2])
            loss = m(input_ids=enc["input_ids"][0], attention_mask=enc["attention_mask"][0], labels=enc["labels"][0]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        m.eval()
        experts.append(m)
    fuser = UltraFuser(dict(zip(DOMAINS, experts)), tok, templates=TEMPLATES)
    train = [x for i in range(4) for x in (data["prose"][i], data["code"][i], data["math"][i])]
    stage1 = UltraFuserTrainer(fuser, _args(tmp_path_factory.mktemp("s1"), 2), stage=1, train_dataset=train)
    stage1.train()
    gate_after_1 = copy.deepcopy(fuser.gate.state_dict())
    lora_before_2 = {n: p.detach().clone() for n, p in delta.get_deltas(experts[0])["fusion_lora"].named_parameters()}
    stage2 = UltraFuserTrainer(fuser, _args(tmp_path_factory.mktemp("s2"), 1), stage=2, lora=delta.LoRAConfig(r=4),
                               train_dataset=train)
    stage2.train()
    fuser.eval()
    return {"fuser": fuser, "tok": tok, "base": base, "gate_after_1": gate_after_1, "lora_before_2": lora_before_2,
            "held": [data[d][5] for d in DOMAINS]}


def test_stages_train_what_they_should(fused):
    fuser = fused["fuser"]
    assert fuser.vocab_size == 49152 and fuser.num_experts == 3
    lora = dict(delta.get_deltas(fuser.experts[0])["fusion_lora"].named_parameters())
    assert any(not torch.equal(lora[n], p) for n, p in fused["lora_before_2"].items())
    assert not torch.equal(fused["gate_after_1"]["scorer.0.weight"], fuser.gate.state_dict()["scorer.0.weight"])
    with torch.no_grad():
        out = fuser(**fuser.encode(fused["held"]))
    assert torch.isfinite(out.loss) and out.gate.shape == (out.n_tokens, 3)


@torch.no_grad()
def _eager_greedy(fuser, prompt, max_new):
    """One row from scratch every step; returns the tokens up to the first near tie."""
    from lmfuse.fusion.data import prompt_ids

    seqs = prompt_ids(fuser.tokenizer, fuser.templates, [{"role": "user", "content": prompt}])
    out = []
    for _ in range(max_new):
        hiddens, logits = [], []
        for m, s in zip(fuser.experts, seqs):
            o = m(input_ids=torch.tensor([s + out]), output_hidden_states=True)
            logits.append(o.logits[0, -1, :fuser.vocab_size].double())
            hiddens.append(o.hidden_states[-1][:, -1])
        w = fuser.gate(hiddens)[0].double()
        z = sum(w[e] * logits[e] for e in range(3))
        top = z.topk(2).values
        if float(top[0] - top[1]) < TIE_MARGIN:
            return out, True
        out.append(int(z.argmax()))
        if out[-1] in (fuser.tokenizer.eos_token_id,):
            break
    return out, False


def test_greedy_fused_generation_equals_the_eager_reference(fused):
    fuser = fused["fuser"]
    prompts = ["What is 41 + 17?", "Continue: Emma Woodhouse, handsome, clever, and rich"]
    out = fuser.generate(prompts, max_new_tokens=3, eos_token_id=[fuser.tokenizer.eos_token_id])
    for b, p in enumerate(prompts):
        ref, tie = _eager_greedy(fuser, p, 3)
        got = out.tokens[b, :int(out.new_tokens[b])].tolist()
        assert got[:len(ref)] == ref, f"row {b}: {got} vs {ref}"
        if not tie:
            assert len(got) == len(ref)
    assert all(isinstance(t, str) for t in out.texts)


def test_cli_with_bundled_stand_ins(fused, monkeypatch, capsys):
    import json

    from lmfuse import cli, models

    monkeypatch.setattr(models, "load_bundled_model", lambda: (fused["base"], fused["tok"]))  # already loaded
    argv = ["fuse", "--expert", "bundled", "--expert", "bundled", "--prompt", "Hi", "--prompt", "What is 2 + 2?",
            "--max-new-tokens", "2", "--json"]
    assert cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["texts"]) == 2 and all(1 <= n <= 2 for n in out["new_tokens"])
    assert any("stand-in" in n for n in out["notices"]) and any("fresh gate" in n for n in out["notices"])
    for g in out["mean_gate"]:  # a fresh gate weighs the two experts equally
        assert g == pytest.approx([0.5, 0.5], abs=1e-6)
