"""Every model-changing call of lmfuse.delta is all or nothing: when it fails, the model is exactly
as before (same module objects, same requires_grad flags, same parameter values, same registry
and hooks) and the same call then works."""

import pytest
import torch
from safetensors.torch import load_file, save_file

import lmfuse.delta.io as delta_io
import lmfuse.delta.model as delta_model
from lmfuse import delta
from lmfuse.modules import LoRALinear

from .tiny import fresh_seed, randomize_deltas, tiny_gpt2, tiny_llama, token_ids


def snapshot(model):
    return {
        "modules": [(n, id(m)) for n, m in model.named_modules(remove_duplicate=False)],
        "params": [(n, id(p), p.requires_grad, p.detach().clone())
                   for n, p in model.named_parameters(remove_duplicate=False)],
        "deltas": {k: (id(d), d.attached, list(d.wrappers)) for k, d in delta.get_deltas(model).items()},
        "hooks": (len(model._forward_pre_hooks), len(model._forward_hooks)),
    }


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after["modules"] == before["modules"]
    assert after["deltas"] == before["deltas"]
    assert after["hooks"] == before["hooks"]
    assert len(after["params"]) == len(before["params"])
    for (n, i, rg, t), (n0, i0, rg0, t0) in zip(after["params"], before["params"]):
        assert (n, i, rg) == (n0, i0, rg0)
        assert torch.equal(t, t0), n


def fail_on_call(monkeypatch, owner, name, n):
    """Make ``owner.name`` raise on its ``n``-th call (the earlier calls run normally)."""
    real = getattr(owner, name)
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise RuntimeError("injected failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapped)


def _model(kind="llama"):
    g = torch.Generator().manual_seed(fresh_seed())
    m = tiny_llama(fresh_seed(), layers=3) if kind == "llama" else tiny_gpt2(fresh_seed())
    return m, g


def test_attach_conflicting_with_a_later_layer_leaves_nothing_behind():
    m, g = _model()
    delta.attach(m, delta.SoRAConfig(r=2, targets=("re:.*layers\\.2\\.self_attn\\.v_proj",)), "late", g)
    ids = token_ids(generator=g)
    with torch.no_grad():
        y = m(input_ids=ids).logits
    before = snapshot(m)
    with pytest.raises(ValueError, match="already carries the sora delta 'late'"):
        delta.attach(m, delta.LoRAConfig(r=2), "lora", g)  # q_proj, v_proj of every layer
    assert_unchanged(m, before)
    with torch.no_grad():
        assert torch.equal(m(input_ids=ids).logits, y)
    delta.detach(m, "late")
    d = delta.attach(m, delta.LoRAConfig(r=2), "lora", g)  # the same name works now
    assert len(d.paths) == 6 and set(delta.get_deltas(m)) == {"lora"}


@pytest.mark.parametrize("cfg", [delta.LoRAConfig(r=2), delta.AdapterConfig(bottleneck=3),
                                 delta.BitFitConfig()], ids=lambda c: c.kind)
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_attach_failing_part_way_is_rolled_back(monkeypatch, cfg, kind):
    m, g = _model(kind)
    delta.attach(m, delta.AdapterConfig(bottleneck=2), "under", g)  # a delta already there
    before = snapshot(m)
    with monkeypatch.context() as mp:
        fail_on_call(mp, delta_model, "build_wrapper", 2)  # one layer wrapped first
        with pytest.raises(RuntimeError, match="injected"):
            delta.attach(m, cfg, "new", g)
    assert_unchanged(m, before)
    delta.attach(m, cfg, "new", g)
    delta.detach(m, "new")
    assert_unchanged(m, before)


def test_soft_prompt_attach_failure_is_rolled_back(monkeypatch):
    m, g = _model()
    before = snapshot(m)
    with monkeypatch.context() as mp:
        fail_on_call(mp, delta_model, "make_hooks", 1)
        with pytest.raises(RuntimeError, match="injected"):
            delta.attach(m, delta.SoftPromptConfig(n_tokens=3), "prompt", g)
    assert_unchanged(m, before)
    delta.attach(m, delta.SoftPromptConfig(n_tokens=3), "prompt", g)


@pytest.mark.parametrize("merged", [False, True])
def test_detach_failing_part_way_is_rolled_back(monkeypatch, merged):
    m, g = _model()
    delta.attach(m, delta.LoRAConfig(r=2), "lora", g)
    delta.attach(m, delta.SoftPromptConfig(n_tokens=2), "prompt", g)
    randomize_deltas(m, g)
    if merged:
        delta.merge(m, "lora")
    before = snapshot(m)
    with monkeypatch.context() as mp:
        fail_on_call(mp, delta_model, "restore_target", 4)
        with pytest.raises(RuntimeError, match="injected"):
            delta.detach(m, "lora")
    assert_unchanged(m, before)
    assert delta.get_deltas(m)["lora"].merged == merged
    delta.detach(m, "lora")
    delta.detach(m, "prompt")
    assert not any(isinstance(x, LoRALinear) for x in m.modules())


@pytest.mark.parametrize("unwrap", [False, True])
def test_merge_failing_part_way_is_rolled_back(monkeypatch, unwrap):
    m, g = _model()
    delta.attach(m, delta.LoRAConfig(r=2), "a", g)
    delta.attach(m, delta.SoRAConfig(r=2, targets=("o_proj",)), "b", g)
    randomize_deltas(m, g)
    before = snapshot(m)
    with monkeypatch.context() as mp:
        fail_on_call(mp, LoRALinear, "merge", 8)  # after all 6 layers of "a" and one of "b"
        with pytest.raises(RuntimeError, match="injected"):
            delta.merge(m, unwrap=unwrap)
    assert_unchanged(m, before)
    assert not any(d.merged for d in delta.get_deltas(m).values())
    assert delta.merge(m, unwrap=unwrap) == ["a", "b"]


def test_unmerge_and_reattach_failures_are_rolled_back(monkeypatch):
    m, g = _model()
    delta.attach(m, delta.LoRAConfig(r=2), "a", g)
    randomize_deltas(m, g)
    delta.merge(m)
    before = snapshot(m)
    with monkeypatch.context() as mp:
        fail_on_call(mp, LoRALinear, "unmerge", 3)
        with pytest.raises(RuntimeError, match="injected"):
            delta.unmerge(m)
    assert_unchanged(m, before)
    delta.unmerge(m)
    d = delta.detach(m, "a")
    before = snapshot(m)
    with monkeypatch.context() as mp:
        fail_on_call(mp, delta_model, "refresh_lora_base", 4)
        with pytest.raises(RuntimeError, match="injected"):
            delta.reattach(m, d)
    assert_unchanged(m, before)
    assert not d.attached
    delta.reattach(m, d)
    assert d.attached and set(delta.get_deltas(m)) == {"a"}


def test_freeze_with_extras_that_address_nothing_changes_no_flag():
    m, g = _model()
    delta.attach(m, delta.LoRAConfig(r=2), "a", g)
    before = snapshot(m)
    assert all(rg for _, _, rg, _ in before["params"])  # attach freezes nothing
    with pytest.raises(ValueError, match="address no backbone parameter"):
        delta.freeze(m, extras=["no_such_module"])
    assert_unchanged(m, before)


def test_load_failing_part_way_leaves_no_delta(tmp_path):
    seed = fresh_seed()
    g = torch.Generator().manual_seed(seed)
    src = tiny_llama(seed)
    delta.attach(src, delta.LoRAConfig(r=2), "first", g)
    delta.attach(src, delta.AdapterConfig(bottleneck=3), "second", g)
    delta.save(src, str(tmp_path))
    weights = tmp_path / delta_io.WEIGHTS_FILE
    tensors = load_file(str(weights))
    dropped = next(k for k in tensors if k.startswith("second/"))
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(weights), metadata={"format": delta_io.FORMAT})

    m = tiny_llama(seed)
    delta.attach(m, delta.BitFitConfig(targets=("down_proj",)), "mine", g)
    before = snapshot(m)
    with pytest.raises(ValueError, match="state mismatch"):
        delta.load(m, str(tmp_path))
    assert_unchanged(m, before)
    with pytest.raises(KeyError, match="nope"):
        delta.load(m, str(tmp_path), names=["first", "nope"])
    assert_unchanged(m, before)
    assert [d.name for d in delta.load(m, str(tmp_path), names=["first"])] == ["first"]
    with pytest.raises(ValueError, match="already attached"):
        delta.load(m, str(tmp_path), names=["first"])
    assert set(delta.get_deltas(m)) == {"mine", "first"}
