"""Alignment: preference optimisation (the DPO family), IFT, reward models, UltraMedical data and
medical multiple-choice evaluation. Every log-prob is computed through the fused vocabulary
kernels (:func:`lmfuse.ops.linear_log_probs`, :func:`lmfuse.losses.sequence_log_probs`).

Names are imported from their submodules on first use, so ``import lmfuse.align`` stays light.
"""

import importlib

# public name -> submodule of lmfuse.align that defines it
_EXPORTS: dict[str, str] = {
    # IFT (intuitive fine-tuning)
    "ift_loss": "ift", "ift_weights": "ift", "ift_lambda": "ift", "ift_inputs": "ift", "ift_model_loss": "ift",
    "IFTOutput": "ift", "IFTConfig": "ift", "IFTTrainer": "ift",
    # preference optimisation
    "PREFERENCE_LOSS_TYPES": "preference", "preference_loss": "preference", "kto_loss": "preference",
    "orpo_loss": "preference", "simpo_loss": "preference", "bt_loss": "preference",
    "wpo_weights": "preference",
    "PreferenceConfig": "pref_trainer", "PreferenceTrainer": "pref_trainer", "PreferenceCollator": "pref_trainer",
    "preference_log_probs": "pref_trainer",
    # reward models
    "RewardModel": "reward", "RewardTrainer": "reward", "RewardCollator": "reward",
    "pairwise_accuracy": "reward",
    # UltraMedical data
    "RecordError": "data", "read_records": "data", "UltraMedicalRecord": "data", "PreferenceRecord": "data",
    "load_ultramedical": "data", "load_ultramedical_preference": "data", "tokenize_chat": "data",
    "preference_features": "data",
    # medical multiple-choice evaluation
    "MCQItem": "medeval", "MCQReport": "medeval", "evaluate_mcq": "medeval", "extract_choice": "medeval",
    "load_mcq": "medeval", "load_pubmedqa": "medeval",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
