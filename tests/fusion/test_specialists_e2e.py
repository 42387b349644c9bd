"""Three tiny Llama specialists (arithmetic, bracket sequences, word-list prose), each trained
briefly on its own domain in its own template, fused with UltraFuser:

* after stage 1 (gate only, balanced batches, UltraFuserTrainer) the gate gives each domain's
  tokens mostly to that domain's specialist, and the fused loss on a mixed held-out set is below
  every single specialist's loss on it;
* save / load round trip (same gate, same loss) and refusal of other experts;
* stage 2 with LoRA deltas trains the deltas and the gate, not the base weights, and the deltas
  round-trip through save / load;
* the analysis table, traces and plot.
"""

import copy

import pytest
import torch

from lmfuse import delta
from lmfuse.fusion import (ExpertMismatchError, UltraFuser, UltraFuserTrainer, gate_table, plot_gate,
                           token_traces)

from .helpers import DOMAINS, TEMPLATES, char_tokenizer, examples, mixed, specialist_loss, tiny_llama, train_specialist

SPECIALIST_STEPS = 100
STAGE1_STEPS = 60


def _args(tmp, steps, batch=24, lr=3e-3, seed=0):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=str(tmp), max_steps=steps, per_device_train_batch_size=batch,
                             per_device_eval_batch_size=128,  # the held-out set in one batch
                             learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, save_strategy="no",
                             report_to=[], disable_tqdm=True, use_cpu=True, seed=seed, logging_strategy="no")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    seed = int(torch.randint(0, 2**30, ()))
    g = torch.Generator().manual_seed(seed)
    tok = char_tokenizer()
    experts = []
    for e, d in enumerate(DOMAINS):
        m = tiny_llama(len(tok), seed=seed + e)
        train_specialist(m, tok, TEMPLATES[e], examples(d, 400, g), steps=SPECIALIST_STEPS, g=g)
        experts.append(m)
    held = mixed(40, g)
    fuser = UltraFuser(dict(zip(DOMAINS, experts)), tok, templates=TEMPLATES)
    before = {k: v.clone() for k, v in fuser.gate.state_dict().items()}
    trainer = UltraFuserTrainer(fuser, _args(tmp_path_factory.mktemp("stage1"), STAGE1_STEPS, seed=seed), stage=1,
                                train_dataset=mixed(160, g))
    trainer.train()
    fuser.eval()
    return {"tok": tok, "fuser": fuser, "held": held, "g": g, "trainer": trainer, "gate_before": before}


def test_stage_one_routes_each_domain_to_its_specialist(world):
    fuser, held = world["fuser"], world["held"]
    table = gate_table(fuser, held)
    assert list(table.index) == sorted(DOMAINS)
    for d in DOMAINS:
        row = table.loc[d, list(DOMAINS)]
        assert row.idxmax() == d, f"domain {d}: gate weights {row.to_dict()}"
        assert row[d] > 0.45, f"domain {d}: gate weights {row.to_dict()}"
        assert abs(row.sum() - 1) < 1e-6


def test_fused_loss_is_below_every_specialist_on_mixed_held_out_data(world):
    fuser, held, tok = world["fuser"], world["held"], world["tok"]
    with torch.no_grad():
        fused = float(fuser(**fuser.encode(held)).loss)
    alone = {d: specialist_loss(m, tok, TEMPLATES[e], held) for e, (d, m) in enumerate(zip(DOMAINS, fuser.experts))}
    assert fused < min(alone.values()), (fused, alone)
    # the trainer's evaluate() reports the same blended loss (one evaluation batch: no mean of means)
    metrics = world["trainer"].evaluate(eval_dataset=held)
    assert abs(metrics["eval_loss"] - fused) < 1e-4 * max(1.0, fused), (metrics, fused)


def test_stage_one_froze_the_experts_and_balanced_the_batches(world):
    trainer, fuser = world["trainer"], world["fuser"]
    assert not any(p.requires_grad for m in fuser.experts for p in m.parameters())
    assert not torch.equal(world["gate_before"]["scorer.2.weight"], fuser.gate.state_dict()["scorer.2.weight"])
    sampler = trainer._get_train_sampler()
    domains = [x["domain"] for x in trainer.train_dataset]
    batch = next(iter(sampler.batches()))
    assert sorted(domains[i] for i in batch) == sorted(DOMAINS * 8)


def test_trainer_refuses_unbalanced_batch_sizes(world, tmp_path):
    with pytest.raises(ValueError, match="not a multiple of the number of domains"):
        UltraFuserTrainer(world["fuser"], _args(tmp_path, 1, batch=10), stage=1, train_dataset=mixed(4, world["g"]))
    with pytest.raises(ValueError, match="stage"):
        UltraFuserTrainer(world["fuser"], _args(tmp_path, 1), stage=3, train_dataset=mixed(8, world["g"]))


def test_balanced_sampling_reads_a_datasets_column(world, tmp_path):
    datasets = pytest.importorskip("datasets")
    from lmfuse.fusion import DomainBalancedSampler

    ds = datasets.Dataset.from_list(mixed(5, world["g"]))
    trainer = UltraFuserTrainer(world["fuser"], _args(tmp_path, 1, batch=6), stage=1, train_dataset=ds)
    sampler = trainer._get_train_sampler()
    assert isinstance(sampler, DomainBalancedSampler) and sampler.num_batches == 2
    for batch in sampler.batches():
        assert sorted(ds[i]["domain"] for i in batch) == sorted(DOMAINS * 2)


def test_save_load_round_trip_and_refusal_of_other_experts(world, tmp_path):
    fuser, tok, held = world["fuser"], world["tok"], world["held"][::4]
    fuser.save_pretrained(str(tmp_path / "fused"))
    fresh = [copy.deepcopy(m) for m in fuser.experts]
    loaded = UltraFuser.from_pretrained(str(tmp_path / "fused"), fresh, tok)
    assert loaded.expert_names == list(DOMAINS) and loaded.templates == TEMPLATES
    with torch.no_grad():
        a, b = fuser(**fuser.encode(held)).loss, loaded(**loaded.encode(held)).loss
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ExpertMismatchError, match="expert 0 \\(math\\).*weights differ"):
        UltraFuser.from_pretrained(str(tmp_path / "fused"), [fresh[1], fresh[0], fresh[2]], tok)
    other = tiny_llama(len(tok), hidden=48, seed=1)
    with pytest.raises(ExpertMismatchError, match="expert 2 \\(prose\\): architecture config differs"):
        UltraFuser.from_pretrained(str(tmp_path / "fused"), [fresh[0], fresh[1], other], tok)
    with pytest.raises(ExpertMismatchError, match="saved with 3 experts, got 2"):
        UltraFuser.from_pretrained(str(tmp_path / "fused"), fresh[:2], tok)


def test_stage_two_with_lora_trains_deltas_and_gate_and_round_trips(world, tmp_path):
    fuser = copy.deepcopy(world["fuser"])
    base = {n: p.detach().clone() for n, p in fuser.experts[0].named_parameters()}
    gate0 = copy.deepcopy(fuser.gate.state_dict())
    held = world["held"][::4]
    trainer = UltraFuserTrainer(fuser, _args(tmp_path / "s2", 6, lr=1e-3), stage=2, lora=delta.LoRAConfig(r=4),
                                train_dataset=mixed(24, world["g"]))
    counts = trainer.stage_counts
    assert 0 < counts["trainable"] < counts["frozen"]
    trainer.train()
    for m in fuser.experts:
        lora = delta.get_deltas(m)["fusion_lora"]
        assert any(p.abs().sum() > 0 for n, p in lora.named_parameters() if n.endswith("lora_B"))
    for n, p in fuser.experts[0].named_parameters():  # base weights untouched (keys gain ".base" when wrapped)
        key = n.replace(".base.", ".")
        if key in base:
            torch.testing.assert_close(p, base[key], rtol=0, atol=0)
    assert not torch.equal(gate0["scorer.0.weight"], fuser.gate.state_dict()["scorer.0.weight"])
    fuser.eval()
    trainer.save_model(str(tmp_path / "fused2"))  # the trainer saves the fuser's own format
    fresh = [copy.deepcopy(m) for m in world["fuser"].experts]  # no deltas: the saved ones are attached
    loaded = UltraFuser.from_pretrained(str(tmp_path / "fused2"), fresh, world["tok"])
    assert all("fusion_lora" in delta.get_deltas(m) for m in loaded.experts)
    with torch.no_grad():
        torch.testing.assert_close(fuser(**fuser.encode(held)).loss, loaded(**loaded.encode(held)).loss,
                                   rtol=0, atol=0)


def test_analysis_table_traces_and_plot(world, tmp_path):
    fuser, held = world["fuser"], world["held"]
    traces = token_traces(fuser, held[:2] + held[-1:])
    for tr, ex in zip(traces, held[:2] + held[-1:]):
        assert "".join(tr.tokens) == ex["response"] + "</s>"
        assert tr.weights.shape == (len(tr.tokens), 3) and tr.domain == ex["domain"]
    table = gate_table(fuser, held)
    assert int(table["tokens"].sum()) == sum(len(x["response"]) + 1 for x in held)
    path = tmp_path / "gate.png"
    fig = plot_gate(table, traces, str(path))
    assert path.stat().st_size > 1000 and len(fig.axes) >= 4
    with pytest.raises(ValueError, match="plot_gate"):
        plot_gate()
