"""``causal_lm_loss`` equals the model's own ``model(..., labels=labels).loss`` (fp32), with the
model's head, bias, logit scale and softcap, and gives the same gradients."""

import pytest
import torch
import torch.nn.functional as F

from lmfuse.losses import causal_lm_loss, output_head
from lmfuse.testing import assert_close_to_reference

from . import tiny
from .tiny import BUILDERS, fresh_seed, token_ids

FP32 = torch.float32


def _labels(ids, generator, frac=0.3):
    labels = ids.clone()
    labels[torch.rand(ids.shape, generator=generator) < frac] = -100
    return labels


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_loss_and_gradients_equal_the_models_own(arch):
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    ids = token_ids(batch=3, seq=13, generator=g)
    labels = _labels(ids, g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding on one row, its labels ignored
    labels[1, 9:] = -100
    stock_model, fused_model = BUILDERS[arch](seed), BUILDERS[arch](seed)
    stock = stock_model(input_ids=ids, attention_mask=mask, labels=labels).loss
    fused = causal_lm_loss(fused_model, ids, labels, mask)
    assert fused.dtype == torch.float32 and fused.dim() == 0
    assert_close_to_reference(fused, stock.double(), FP32, f"{arch} loss")
    stock.backward()
    fused.backward()
    gs, gf = _grads(stock_model), _grads(fused_model)
    assert gs.keys() == gf.keys() and len(gs) > 0
    for name in gs:
        assert_close_to_reference(gf[name], gs[name].double(), FP32, f"{arch} grad {name}", factor=5)


@pytest.mark.parametrize("arch", ["gemma2-softcap", "cohere-logit-scale", "granite-logits-scaling"])
def test_the_models_logit_transform_matters(arch):
    """Control for the test above: dropping the model's softcap / scale changes the loss, so the
    equality there really checks that they are read from the model."""
    seed = fresh_seed()
    m = BUILDERS[arch](seed)
    ids = token_ids(generator=torch.Generator().manual_seed(seed))
    head = output_head(m)
    assert (head.softcap is not None) or head.logit_scale != 1.0
    plain = causal_lm_loss(m, ids, ids, logit_scale=1.0, softcap=None)
    own = m(input_ids=ids, labels=ids).loss
    assert abs(plain.item() - own.item()) > 1e-2 * abs(own.item())


def test_head_is_read_from_the_model():
    m = tiny.gemma2(fresh_seed(), softcap=7.5)
    head = output_head(m)
    assert head.weight is m.lm_head.weight is m.get_input_embeddings().weight  # tied, not copied
    assert head.softcap == 7.5 and head.logit_scale == 1.0 and head.vocab_size == tiny.VOCAB
    assert output_head(tiny.cohere(fresh_seed(), logit_scale=2.5)).logit_scale == pytest.approx(2.5)
    assert output_head(tiny.granite(fresh_seed(), logits_scaling=0.4)).logit_scale == pytest.approx(2.5)
    assert output_head(tiny.llama_with_head_bias(fresh_seed())).bias is not None
    assert output_head(tiny.gpt2(fresh_seed())).backbone is not None


def _logits(model, ids, mask=None):
    return model(input_ids=ids, attention_mask=mask).logits.double()


def test_reductions_label_smoothing_z_loss_and_token_weights_against_full_logits():
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    m = tiny.gemma2(seed)
    ids = token_ids(batch=2, seq=10, generator=g)
    labels = _labels(ids, g)
    with torch.no_grad():
        z = _logits(m, ids)[:, :-1].reshape(-1, tiny.VOCAB)
        t = labels[:, 1:].reshape(-1)
        per_tok = F.cross_entropy(z, t, reduction="none", ignore_index=-100).view(2, 9)
        smooth = F.cross_entropy(z, t, reduction="none", ignore_index=-100, label_smoothing=0.2).view(2, 9)
        lse = torch.logsumexp(z, -1).view(2, 9)
        valid = labels[:, 1:] != -100
        none = causal_lm_loss(m, ids, labels, reduction="none")
        assert none.shape == (2, 10)
        assert_close_to_reference(none[:, :-1], per_tok, FP32, "reduction=none")
        assert torch.equal(none[:, -1], torch.zeros(2))  # the last position predicts nothing
        assert_close_to_reference(causal_lm_loss(m, ids, labels, reduction="sum"), per_tok.sum(), FP32, "sum")
        ls = causal_lm_loss(m, ids, labels, label_smoothing=0.2)
        assert_close_to_reference(ls, smooth.sum() / valid.sum(), FP32, "label smoothing")
        zl = causal_lm_loss(m, ids, labels, z_loss_scale=1e-2)
        ref = (per_tok + 1e-2 * lse**2 * valid).sum() / valid.sum()
        assert_close_to_reference(zl, ref, FP32, "z-loss")
        w = torch.rand(2, 10, generator=g) + 0.5
        wl = causal_lm_loss(m, ids, labels, token_weight=w, reduction="sum")
        assert_close_to_reference(wl, (per_tok * w[:, 1:]).sum(), FP32, "token_weight (aligned with labels)")
        loss, lse_out = causal_lm_loss(m, ids, labels, return_lse=True)
        assert lse_out.shape == (2, 10) and lse_out.dtype == torch.float32
        assert_close_to_reference(lse_out[:, :-1][valid], lse[valid], FP32, "lse")


def test_num_items_in_batch_divides_the_sum_like_transformers():
    seed = fresh_seed()
    m = tiny.llama(seed)
    ids = token_ids(generator=torch.Generator().manual_seed(seed))
    n = torch.tensor(57)
    stock = m(input_ids=ids, labels=ids, num_items_in_batch=n).loss
    fused = causal_lm_loss(m, ids, ids, num_items_in_batch=n)
    assert_close_to_reference(fused, stock.double(), FP32, "num_items_in_batch")
    with pytest.raises(ValueError, match="reduction"):
        causal_lm_loss(m, ids, ids, num_items_in_batch=n, reduction="sum")


def test_all_labels_ignored_gives_zero_loss_and_zero_grads():
    m = tiny.llama(fresh_seed())
    ids = token_ids()
    loss = causal_lm_loss(m, ids, torch.full_like(ids, -100))
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() and not g.any() for g in grads)


def test_bad_arguments_are_named():
    m = tiny.llama(fresh_seed())
    ids = token_ids()
    with pytest.raises(ValueError, match="labels"):
        causal_lm_loss(m, ids, ids[:, :-1])
    with pytest.raises(TypeError, match="labels"):
        causal_lm_loss(m, ids, ids.tolist())
    with pytest.raises(ValueError, match="attention_mask"):
        causal_lm_loss(m, ids, ids, torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="temperature"):
        causal_lm_loss(m, ids, ids, temperature=2.0)
    with pytest.raises(ValueError, match="token_weight"):
        causal_lm_loss(m, ids, ids, token_weight=torch.ones(3))


def test_a_head_that_is_not_a_plain_linear_is_refused():
    """An adapter on the output head would be silently bypassed: refuse it."""
    from lmfuse import delta

    m = tiny.llama(fresh_seed())
    delta.attach(m, delta.LoRAConfig(r=2, targets=["lm_head"]), "head_lora")
    with pytest.raises(TypeError, match="plain nn.Linear"):
        causal_lm_loss(m, token_ids(), token_ids())
    m2 = tiny.llama(fresh_seed())
    m2.lm_head.register_forward_hook(lambda mod, a, out: out * 2)
    with pytest.raises(TypeError, match="hooks"):
        causal_lm_loss(m2, token_ids(), token_ids())


def test_unknown_logit_scaling_is_refused_not_guessed():
    m = tiny.llama(fresh_seed())
    m.config.logits_scaling = 3.0  # a Llama never reads this: what would it mean?
    with pytest.raises(NotImplementedError, match="logits_scaling"):
        output_head(m)
    assert output_head(m, logit_scale=1.0).logit_scale == 1.0  # an explicit value is taken as given


def test_a_peft_wrapped_model_is_looked_through():
    import peft

    seed = fresh_seed()
    base = tiny.llama(seed)
    pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.2)
    ids = token_ids(generator=torch.Generator().manual_seed(seed))
    own = pm(input_ids=ids, labels=ids).loss
    fused = causal_lm_loss(pm, ids, ids)
    assert_close_to_reference(fused, own.double(), FP32, "PEFT LoRA model loss")
    fused.backward()
    got = {n: p.grad.clone() for n, p in pm.named_parameters() if p.requires_grad}
    pm.zero_grad()
    own.backward()
    assert len(got) == 8  # q_proj and v_proj, A and B, two layers
    for n, p in pm.named_parameters():
        if p.requires_grad:
            assert_close_to_reference(got[n], p.grad.double(), FP32, f"PEFT grad {n}", factor=5)


def test_autocast_bf16_follows_the_models_own_precision():
    """Under CPU autocast the model's lm_head runs in bf16; the fused head is cast the same way
    (the op needs hidden and weight in one dtype), and the loss matches within bf16 error."""
    seed = fresh_seed()
    m = tiny.llama(seed)
    ids = token_ids(generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        exact = m(input_ids=ids, labels=ids).loss.double()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            own = m(input_ids=ids, labels=ids).loss
            fused = causal_lm_loss(m, ids, ids)
    own_err = abs(own.double() - exact).item()
    assert abs(fused.double() - exact).item() <= max(4 * own_err, 1e-2 * exact.item())


def test_bf16_hidden_states_with_an_fp32_head():
    """Mixed precision on a GPU gives bf16 hidden states while the head's master weight stays
    fp32: the head is cast to the hidden states' dtype, as the model's own bf16 lm_head call does."""
    from lmfuse.losses import shifted_loss

    seed = fresh_seed()
    m = tiny.llama(seed)
    ids = token_ids(generator=torch.Generator().manual_seed(seed))
    head = output_head(m)
    with torch.no_grad():
        hidden = head.backbone(input_ids=ids).last_hidden_state.to(torch.bfloat16)
        logits = (hidden @ head.weight.to(torch.bfloat16).t()).double()  # what a bf16 lm_head computes
        ref = F.cross_entropy(logits[:, :-1].reshape(-1, tiny.VOCAB), ids[:, 1:].reshape(-1))
        fused = shifted_loss(head, hidden, ids)
    assert fused.dtype == torch.float32
    assert_close_to_reference(fused, ref, torch.bfloat16, "bf16 hidden, fp32 head")
