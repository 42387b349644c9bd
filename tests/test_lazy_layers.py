"""Every layer of lmfuse is reachable as an attribute of the package, imported on first use, and
``import lmfuse`` itself stays light (no transformers, no Triton, no CUDA initialisation)."""

import subprocess
import sys

import pytest

import lmfuse

PRESENT = [n for n in lmfuse.LAYERS if n in lmfuse.__all__]


@pytest.mark.parametrize("name", ["delta", "collab", "sora", "models", "modules", "lpa", "bench", "testing"])
def test_core_layers_exist(name):
    assert name in PRESENT


@pytest.mark.parametrize("name", PRESENT)
def test_layer_is_reachable_as_an_attribute_and_listed_in_the_docstring(name):
    code = ("import lmfuse, importlib\n"
            f"m = lmfuse.{name}\n"
            f"assert m is importlib.import_module('lmfuse.{name}'), m\n"
            f"assert '{name}' in dir(lmfuse)\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    assert f":mod:`lmfuse.{name}`" in lmfuse.__doc__


def test_every_subpackage_is_a_layer():
    import pkgutil

    subpackages = {m.name for m in pkgutil.iter_modules(lmfuse.__path__) if m.ispkg}
    assert subpackages - {"ops", "triton_kernels"} <= set(lmfuse.LAYERS), subpackages


def test_missing_layer_and_unknown_name_raise_attribute_error():
    with pytest.raises(AttributeError, match="no_such_layer"):
        lmfuse.no_such_layer  # noqa: B018
    for name in lmfuse.LAYERS:
        if name not in PRESENT:
            with pytest.raises(AttributeError, match=name):
                getattr(lmfuse, name)


def test_import_lmfuse_stays_light():
    code = ("import sys, torch, lmfuse\n"
            "assert not torch.cuda.is_initialized()\n"
            "bad = [m for m in sys.modules if m.startswith(('triton', 'transformers', 'lmfuse.delta', "
            "'lmfuse.collab', 'lmfuse.sora'))]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
