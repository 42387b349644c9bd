"""LoRA attached by lmfuse.delta computes what peft's LoRA computes with the same weights."""

import pytest
import torch

from lmfuse import delta
from lmfuse.testing import assert_close_to_reference

from .tiny import fresh_seed, randomize_deltas, tiny_gpt2, tiny_llama, token_ids

peft = pytest.importorskip("peft")


@pytest.mark.parametrize("build, targets, fan_in_fan_out", [
    (tiny_llama, ["q_proj", "v_proj", "down_proj"], False),
    (tiny_gpt2, ["c_attn", "c_fc"], True),     # Conv1D: weight stored [in, out]
])
def test_lora_matches_peft(build, targets, fan_in_fan_out):
    g = torch.Generator().manual_seed(fresh_seed())
    seed = fresh_seed()
    ours = build(seed).double()  # float64 on both sides: any difference is a real one
    d = delta.attach(ours, delta.LoRAConfig(r=4, lora_alpha=12.0, targets=tuple(targets)), "lora", g)
    randomize_deltas(ours, g)
    ref = peft.get_peft_model(build(seed).double(), peft.LoraConfig(r=4, lora_alpha=12, target_modules=targets,
                                                           lora_dropout=0.0, fan_in_fan_out=fan_in_fan_out))
    copied = 0
    with torch.no_grad():
        for name, mod in ref.named_modules():
            if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
                path = name.removeprefix("base_model.model.")
                mod.lora_A["default"].weight.copy_(d.wrappers[path].lora_A)
                mod.lora_B["default"].weight.copy_(d.wrappers[path].lora_B)
                copied += 1
    assert copied == len(d.paths) > 0
    ids = token_ids(generator=g)
    with torch.no_grad():
        theirs = ref(input_ids=ids).logits
        assert_close_to_reference(ours(input_ids=ids).logits, theirs, torch.float64, "logits vs peft")
    # and the gradients of the LoRA factors agree
    ours(input_ids=ids, labels=ids).loss.backward()
    ref(input_ids=ids, labels=ids).loss.backward()
    for name, mod in ref.named_modules():
        if hasattr(mod, "lora_A") and "default" in getattr(mod, "lora_A", {}):
            w = d.wrappers[name.removeprefix("base_model.model.")]
            assert_close_to_reference(w.lora_A.grad, mod.lora_A["default"].weight.grad, torch.float64, f"{name} dA")
            assert_close_to_reference(w.lora_B.grad, mod.lora_B["default"].weight.grad, torch.float64, f"{name} dB")
