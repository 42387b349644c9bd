"""The ``lmfuse`` command line (also ``python -m lmfuse``).

Subcommands are registered with :func:`command`: a decorated function receives the
``argparse`` sub-parser to fill and returns the handler ``handler(args) -> int``. Adding one
elsewhere (``lmfuse generate``, say) is a function in a module listed in
``COMMAND_MODULES``; such modules must import only the standard library at top level, because
every ``lmfuse`` invocation imports them to build the parser. Heavy imports (torch, lmfuse.ops,
matplotlib) happen inside handlers, so ``import lmfuse.cli`` initialises no CUDA context.

``lmfuse info [--json]``      versions, devices, backends, compiled extensions
``lmfuse bench [options]``    run the benchmark suite (``lmfuse bench --help``)
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Callable

Handler = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], Handler]]] = {}

# Modules that register more subcommands with @command when imported (stdlib-only top level).
COMMAND_MODULES: tuple[str, ...] = ("lmfuse.cli_generate", "lmfuse.cli_eval", "lmfuse.cli_fuse", "lmfuse.cli_proteus")


def command(name: str, help: str):
    """Register ``fn(parser) -> handler`` as the subcommand ``name``."""
    def register(fn: Callable[[argparse.ArgumentParser], Handler]):
        if name in _COMMANDS:
            raise ValueError(f"lmfuse subcommand {name!r} registered twice")
        _COMMANDS[name] = (help, fn)
        return fn
    return register


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# ---------------------------------------------------------------------------------------- info


def _extension_info(name: str) -> dict:
    """Whether ``lmfuse.<name>`` imports, and from where."""
    full = f"lmfuse.{name}"
    try:
        spec = importlib.util.find_spec(full)
    except Exception as e:
        return {"built": False, "importable": False, "path": None, "error": f"{type(e).__name__}: {e}"}
    if spec is None:
        return {"built": False, "importable": False, "path": None, "error": "not built"}
    try:
        importlib.import_module(full)
        err = None
    except Exception as e:  # a stale build: undefined symbols, wrong torch ABI, ...
        err = f"{type(e).__name__}: {e}"
    return {"built": True, "importable": err is None, "path": spec.origin, "error": err}


def collect_info() -> dict:
    """Everything ``lmfuse info`` reports, as a JSON-serialisable dict."""
    import platform

    from lmfuse.bench.report import cpu_isa, cpu_model

    try:
        import lmfuse

        version = getattr(lmfuse, "__version__", None) or _version("lmfuse")
    except Exception as e:
        version = f"import failed: {type(e).__name__}: {e}"
    info: dict = {
        "lmfuse": version,
        "python": platform.python_version(),
        "torch": _version("torch"),
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "platform": platform.platform(),
    }
    devices: dict = {"cpu": f"{cpu_model()} ({os.cpu_count()} cores)", "cpu_isa": cpu_isa(), "cuda_available": False, "cuda": []}
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            devices["cuda_available"] = True
            devices["cuda"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception as e:
        devices["error"] = f"torch: {type(e).__name__}: {e}"
    info["devices"] = devices
    try:
        from lmfuse.ops import available_backends

        info["backends"] = {name: {"available": bool(s.available), "reason": s.reason}
                            for name, s in available_backends().items()}
    except Exception as e:
        info["backends"] = {"error": f"{type(e).__name__}: {e}"}
    info["extensions"] = {name: _extension_info(name) for name in ("_C", "_C_cuda")}
    return info


def _print_info(info: dict) -> None:
    for key in ("lmfuse", "python", "torch", "triton", "transformers", "platform"):
        print(f"{key:13s} {info[key]}")
    dev = info["devices"]
    print(f"{'cpu':13s} {dev['cpu']}{', ' + dev['cpu_isa'] if dev.get('cpu_isa') else ''}")
    print(f"{'cuda':13s} {', '.join(dev['cuda']) if dev['cuda_available'] else 'not available'}")
    print("backends:")
    for name, b in info["backends"].items():
        if name == "error":
            print(f"  (lmfuse.ops unavailable: {b})")
        else:
            print(f"  {name:10s} {'yes' if b['available'] else 'no ':3s}  {b['reason']}")
    print("extensions:")
    for name, e in info["extensions"].items():
        state = "ok" if e["importable"] else ("broken" if e["built"] else "not built")
        print(f"  lmfuse.{name:8s} {state:9s} {e['path'] or ''}{'  ' + e['error'] if e['error'] and e['built'] else ''}")


@command("info", help="versions, devices, backends and compiled extensions")
def _info_command(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")

    def run(args: argparse.Namespace) -> int:
        info = collect_info()
        if args.json:
            print(json.dumps(info, indent=1))
        else:
            _print_info(info)
        return 0
    return run


# --------------------------------------------------------------------------------------- bench


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _seconds(text: str) -> float:
    """An argparse ``type=``: a positive, finite number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


@command("bench", help="run the benchmark suite (results under benchmarks/results/<device>/)")
def _bench_command(p: argparse.ArgumentParser) -> Handler:
    p.add_argument("--quick", action="store_true", help="fewer, smaller shapes and shorter timing")
    p.add_argument("--ops", type=_csv, default=None, help="comma-separated ops (default: all); see --list")
    p.add_argument("--modes", type=_csv, default="fwd,bwd,full", help="subset of fwd,bwd,full")
    p.add_argument("--out", type=Path, default=None,
                   help="results directory (default: ./benchmarks/results/<device-slug>)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--list", action="store_true", help="list the available benchmarks and exit")
    p.add_argument("--budget", type=_seconds, default=None, metavar="SECONDS",
                   help="time budget: every op's headline case runs first, each result is written as soon "
                        "as it is measured, and no case starts once the budget is spent (default: no limit)")
    # Hidden: the smallest shapes, for the test-suite (also LMFUSE_BENCH_TINY=1).
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)

    def run(args: argparse.Namespace) -> int:
        import torch

        from lmfuse.bench import suite
        from lmfuse.bench.report import device_slug, git_commit, run_info

        if args.list:
            for op, module in suite.discover().items():
                print(f"{op:24s} {module}")
            return 0
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            print("lmfuse bench: --device cuda asked for, but torch sees no CUDA device", file=sys.stderr)
            return 2
        tiny = args.tiny or os.environ.get("LMFUSE_BENCH_TINY", "0") == "1"
        scale = "tiny" if tiny else ("quick" if args.quick else "full")
        out = args.out or Path.cwd() / "benchmarks" / "results" / device_slug(device)
        info = run_info(device, git_commit(Path(__file__).resolve().parent))
        try:
            results = suite.run_suite(args.ops, device, scale, args.modes, out, plot=not args.no_plot,
                                      progress=not args.no_progress, info=info, budget_s=args.budget)
        except (KeyError, ValueError) as e:
            print(f"lmfuse bench: {e.args[0] if e.args else e}", file=sys.stderr)
            return 2
        failures = 0
        for res in results:
            if res.error:
                failures += 1
                print(f"FAILED {res.op}: {res.error}", file=sys.stderr)
            for m in res.failed:
                failures += 1
                print(f"FAILED {m.op} {m.provider} {m.mode} {m.shape}: {m.note}", file=sys.stderr)
        written = [str(f) for res in results for f in res.files]
        print(f"results: {out}" + (f" ({len(written)} files)" if written else " (nothing written)"))
        return 1 if failures else 0
    return run


# ---------------------------------------------------------------------------------------- main


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """``--help`` shows each option's default, except where there is none to show (None, a flag
    that is off) or the help text already states it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or "default" in text or action.default is None
                or action.default is False or action.default is argparse.SUPPRESS):
            return text
        return text + " (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
    """The full parser: every registered subcommand, the COMMAND_MODULES ones included."""
    for module in COMMAND_MODULES:
        if importlib.util.find_spec(module) is not None:  # a layer's command module may be absent
            importlib.import_module(module)
    parser = argparse.ArgumentParser(prog="lmfuse", description="lmfuse: fused kernels for language models")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, setup) in _COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text,
                            formatter_class=DefaultsHelpFormatter)
        sp.set_defaults(_handler=setup(sp))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``lmfuse`` script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_handler", None) is None:
        parser.print_help()
        return 2
    return int(args._handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
