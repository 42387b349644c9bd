"""Plug-and-play delta tuning (the OpenDelta feature set) on ``transformers`` models.

```python
from lmfuse import delta

delta.attach(model, delta.LoRAConfig(r=8))                      # default targets per architecture
delta.attach(model, delta.AdapterConfig(bottleneck=32), name="adapter")
delta.freeze(model)                                             # only the deltas train
print(delta.summary(model))
delta.save(model, "out/")                                       # the deltas alone
delta.load(fresh_backbone, "out/")                              # refuses a different backbone
delta.merge(model, unwrap=True)                                 # LoRA into the base weights
```

See ``docs/delta.md``.
"""

from .addressing import DEFAULT_TARGETS, default_targets, name_matches, resolve_targets
from .deltas import (AdapterConfig, BitFitConfig, CompacterConfig, DeltaConfig, LoRAConfig,
                     LowRankAdapterConfig, ParallelAdapterConfig, PrefixConfig, SoftPromptConfig, SoRAConfig)
from .io import BackboneMismatchError, backbone_identity, load, save
from .model import (Delta, attach, delta_parameters, detach, freeze, get_deltas, merge, reattach,
                    unmerge)
from .summary import parameter_counts, summary

__all__ = [
    "DEFAULT_TARGETS", "default_targets", "name_matches", "resolve_targets",
    "DeltaConfig", "LoRAConfig", "SoRAConfig", "AdapterConfig", "ParallelAdapterConfig",
    "BitFitConfig", "SoftPromptConfig", "CompacterConfig", "LowRankAdapterConfig", "PrefixConfig",
    "Delta", "attach", "detach", "reattach", "merge", "unmerge", "freeze", "get_deltas",
    "delta_parameters", "save", "load", "BackboneMismatchError", "backbone_identity",
    "summary", "parameter_counts",
]
