"""A readable view of a model with deltas: a tree of its modules (identical repeated layers
collapsed to one), deltas marked where they attach, and parameter counts and ratios."""

from __future__ import annotations

from torch import nn

from .addressing import innermost, is_delta_wrapper
from .model import get_deltas, unwrap_model

MARK = "◆"


def _fmt(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def _delta_marks(slot_module: nn.Module) -> list[str]:
    marks, cur = [], slot_module
    while is_delta_wrapper(cur):
        own = sum(p.numel() for n, p in cur.named_parameters() if not n.startswith("base."))
        extra = f" r={cur.r}" if hasattr(cur, "r") else ""
        marks.append(f"{MARK} {cur._lmfuse_delta_kind}[{cur._lmfuse_delta_name}]{extra} +{_fmt(own)}")
        cur = cur.base
    return marks


def _label(module: nn.Module) -> str:
    if not list(module.children()):
        text = repr(module)  # leaves: their own one-line repr (e.g. GPT-2's Conv1D(nf=…, nx=…))
        if "\n" not in text:
            return text
    return type(module).__name__


def _lines(name: str, slot_module: nn.Module, depth: int, max_depth: int) -> list[str]:
    module = innermost(slot_module)
    if getattr(module, "_lmfuse_delta_internal", False):
        n = sum(p.numel() for p in module.parameters())
        return [f"{name}: {MARK} {type(module).__name__} +{_fmt(n)}"]
    marks = _delta_marks(slot_module)
    head = f"{name}: {_label(module)}" + ("  " + "  ".join(marks) if marks else "")
    children = list(module.named_children())
    if depth >= max_depth or not children:
        return [head]
    body: list[str] = []
    # collapse runs of identical children (the usual stack of decoder layers) into one entry
    rendered = [(n, _lines(n, c, depth + 1, max_depth)) for n, c in children]
    i = 0
    while i < len(rendered):
        n, lines = rendered[i]
        j = i + 1
        while isinstance(module, (nn.ModuleList, nn.Sequential)) and j < len(rendered) and rendered[j][1][1:] == lines[1:] \
                and rendered[j][1][0].split(":", 1)[1] == lines[0].split(":", 1)[1]:
            j += 1
        if j - i > 1:
            lines = [f"{n}-{rendered[j - 1][0]}: {j - i} × {lines[0].split(': ', 1)[1]}"] + lines[1:]
        body.append(lines)
        i = j
    out = [head]
    for k, lines in enumerate(body):
        last = k == len(body) - 1
        out.append(("└─ " if last else "├─ ") + lines[0])
        out.extend(("   " if last else "│  ") + line for line in lines[1:])
    return out


def parameter_counts(model: nn.Module) -> dict:
    """``total``, ``trainable``, ``delta``, ``backbone`` counts and the ``delta/backbone``,
    ``trainable/total`` ratios, plus ``per_delta`` (name → kind, modules, params)."""
    model = unwrap_model(model)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    per = {name: {"kind": d.kind, "modules": len(d.paths) if d.soft is None else 0,
                  "params": d.num_parameters()} for name, d in get_deltas(model).items()}
    delta = sum(v["params"] for v in per.values())
    backbone = total - delta
    return {"total": total, "trainable": trainable, "delta": delta, "backbone": backbone,
            "delta_ratio": delta / backbone if backbone else float("nan"),
            "trainable_ratio": trainable / total if total else float("nan"), "per_delta": per}


def summary(model: nn.Module, max_depth: int = 6) -> str:
    """The module tree (``max_depth`` levels) with ``◆ kind[name]`` at each delta, then counts."""
    model = unwrap_model(model)
    tree = _lines(type(model).__name__, model, 0, max_depth)
    tree[0] = tree[0].split(": ", 1)[1]
    c = parameter_counts(model)
    rows = [f"{'delta':<16}{'kind':<18}{'modules':>8}{'params':>12}"]
    rows += [f"{n:<16}{v['kind']:<18}{v['modules']:>8}{v['params']:>12,}" for n, v in c["per_delta"].items()]
    counts = [
        f"backbone parameters : {c['backbone']:>14,}",
        f"delta parameters    : {c['delta']:>14,}  ({100 * c['delta_ratio']:.4f}% of the backbone)",
        f"trainable parameters: {c['trainable']:>14,}  ({100 * c['trainable_ratio']:.4f}% of all)",
    ]
    return "\n".join(tree + [""] + rows + [""] + counts)
