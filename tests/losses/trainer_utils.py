"""Train a model with a stock ``transformers.Trainer`` and record its loss at every step."""

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments


class Examples(torch.utils.data.Dataset):
    """Fixed causal-LM examples: ``input_ids``, ``attention_mask``, ``labels`` (-100 on padding)."""

    def __init__(self, ids: torch.Tensor, mask: torch.Tensor):
        self.ids, self.mask = ids, mask

    def __len__(self):
        return self.ids.shape[0]

    def __getitem__(self, i):
        labels = self.ids[i].masked_fill(self.mask[i] == 0, -100)
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": labels}


def random_examples(n, seq, vocab, generator):
    ids = torch.randint(0, vocab, (n, seq), generator=generator)
    mask = torch.ones_like(ids)
    lengths = torch.randint(seq // 2, seq + 1, (n,), generator=generator)
    for i, length in enumerate(lengths.tolist()):
        mask[i, length:] = 0  # right padding of varying length: token counts differ per batch
    return Examples(ids, mask)


class _Losses(TrainerCallback):
    def __init__(self):
        self.losses = []

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


def train(model, dataset, out_dir, *, steps=4, batch=2, accumulation=1, lr=1e-3, optim="adamw_torch", **args):
    """Train ``steps`` optimizer steps; return the per-step logged losses."""
    rec = _Losses()
    targs = TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
        max_steps=steps, learning_rate=lr, lr_scheduler_type="constant", optim=optim, weight_decay=0.0,
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, data_seed=0,
        dataloader_num_workers=0, disable_tqdm=True, **args)
    model.train()
    Trainer(model=model, args=targs, train_dataset=dataset, callbacks=[rec]).train()
    return rec.losses
