"""Token-level fusion of specialist LMs (UltraFuser).

```python
from lmfuse.fusion import UltraFuser, UltraFuserTrainer

fuser = UltraFuser([text_lm, code_lm, math_lm], tokenizer, templates=["User: {prompt}\\nAssistant:", None, None])
loss = fuser(**fuser.encode(examples)).loss            # blended CE on the response tokens
UltraFuserTrainer(fuser, args, stage=1, train_dataset=examples).train()   # gate only
UltraFuserTrainer(fuser, args, stage=2, lora=delta.LoRAConfig(r=8), train_dataset=examples).train()
out = fuser.generate(["What is 12 * 7?"], max_new_tokens=32)   # batched, one KV cache per expert
fuser.save_pretrained("fused/")                         # gate + deltas + expert fingerprints
```

See ``docs/fusion.md``.
"""

from .analysis import TokenTrace, gate_table, plot_gate, token_traces
from .data import DomainBalancedSampler, FusionCollator, encode_examples
from .generate import FusionGenerateOutput, fused_generate
from .io import ExpertMismatchError, expert_fingerprint, load_fuser, save_fuser
from .trainer import UltraFuserTrainer, set_stage
from .ultrafuser import FusionOutput, GateWeights, TokenizerMismatchError, UltraFuser

__all__ = [
    "UltraFuser", "FusionOutput", "GateWeights", "TokenizerMismatchError",
    "UltraFuserTrainer", "set_stage", "DomainBalancedSampler", "FusionCollator", "encode_examples",
    "fused_generate", "FusionGenerateOutput", "save_fuser", "load_fuser", "expert_fingerprint",
    "ExpertMismatchError", "gate_table", "token_traces", "TokenTrace", "plot_gate",
]
