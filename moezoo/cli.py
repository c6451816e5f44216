"""The ``moezoo`` command line.

    moezoo list [PATTERN] [--family F] [--pretrained] [--markdown] [--update-readme README.md]
    moezoo info NAME|FOLDER [--tiny]
    moezoo parity REFERENCE FOLDER
    moezoo convert REFERENCE SRC DST [--config PATH] [--allow-pickle] [--option KEY=VALUE ...]
    moezoo push DIR REPO_ID [--dry-run] [--private] [--staging-dir DIR] [--commit-message MSG] [--allow-pickle]
    moezoo bench NAME [ARGS ...]
    moezoo demo [--output-dir DIR] [--steps NAME ...] [--quick]

Errors print one line ``moezoo: error: ...`` and exit with status 2 (no traceback; ``MOEZOO_DEBUG=1`` shows it);
``moezoo parity`` exits 1 when an output does not match.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

# ``moezoo bench NAME`` -> module whose ``main(argv)`` runs the benchmark (the lead adds entries here)
BENCHMARKS: dict[str, str] = {
    "moe-layer": "moezoo.bench_moe_layer",
}


class CLIError(Exception):
    """A user error reported as one line (exit status 2)."""


def _print_table(rows: list[list[str]], header: list[str]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    print(fmt.format(*header))
    print(fmt.format(*["-" * w for w in widths]))
    for r in rows:
        print(fmt.format(*[str(c) for c in r]))


# ------------------------------------------------------------------------------------------------ commands
def cmd_list(args) -> int:
    import moezoo
    from moezoo.registry import get_model_entry, models_markdown

    if args.markdown:
        print(models_markdown())
        return 0
    if args.update_readme:
        from moezoo.registry import update_readme

        update_readme(args.update_readme)
        print(f"updated the registered-models table of {args.update_readme}")
        return 0
    if args.pretrained:
        for item in moezoo.list_pretrained(args.pattern):
            print(item)
        return 0
    if args.family is not None and args.family not in ("",):
        from moezoo.registry import get_family

        get_family(args.family)  # unknown family -> error with suggestions
    names = moezoo.list_models(args.pattern, family=args.family)
    if not names:
        print(f"no registered model matches {args.pattern!r}" + (f" in family {args.family!r}" if args.family else ""))
        return 0
    rows = []
    for n in names:
        e = get_model_entry(n)
        ek = e.experts_and_k
        rows.append([n, e.family, f"{ek[0]}/{ek[1]}" if ek else "-", e.description])
    _print_table(rows, ["name", "family", "E/k", "description"])
    return 0


def _config_for_info(target: str, tiny: bool):
    import moezoo
    from moezoo.registry import family_of_model_type, get_model_entry

    p = Path(target)
    if p.is_dir():
        from transformers import AutoConfig

        if not (p / "config.json").is_file():
            raise CLIError(f"{target!r} is a folder without config.json")
        config = AutoConfig.from_pretrained(str(p))
        fam = family_of_model_type(config.model_type)
        if fam is None:
            raise CLIError(f"{target!r} holds a {config.model_type!r} model, not a moezoo family")
        archs = getattr(config, "architectures", None) or []
        cls = next((c for c in [fam.model_class, *fam.task_classes.values()] if c.__name__ in archs), fam.default_class)
        return str(p), fam, config, cls
    entry = get_model_entry(target)
    config = moezoo.get_model_config(target, tiny=tiny)
    from moezoo.registry import get_family

    fam = get_family(entry.family)
    return entry.name + (" (tiny)" if tiny else ""), fam, config, None


def cmd_info(args) -> int:
    import torch

    from moezoo.safety import format_count
    from moezoo.registry import create_model

    label, fam, config, cls = _config_for_info(args.name, args.tiny)
    with torch.device("meta"):  # sizes only: nothing is allocated
        model = cls(config) if cls is not None else create_model(args.name, tiny=args.tiny)
    s = model.parameter_summary()
    print(f"model:            {label}")
    print(f"family:           {fam.name} (model_type {config.model_type!r}, class {type(model).__name__})")
    print(f"parameters:       {format_count(s['total'])} total, {format_count(s['active'])} active per token "
          f"({s['total']:,} / {s['active']:,})")
    impl = model.config._experts_implementation
    print(f"experts impl.:    {impl} (switch with model.set_experts_implementation)")
    print(f"MoE layers:       {len(s['moe_layers'])}"
          + (f" of {config.num_hidden_layers} layers" if hasattr(config, "num_hidden_layers") else ""))
    if s["moe_layers"]:
        rows = [[layer["name"], layer["num_experts"], layer["top_k"], layer["routable"], layer["router"],
                 layer["router_type"], layer["scoring"] or "-", layer["shared_experts"],
                 format_count(layer["expert_params"])] for layer in s["moe_layers"]]
        _print_table(rows, ["layer", "experts", "top_k", "routable", "router", "router_type", "scoring", "shared",
                            "expert params"])
    return 0


def cmd_parity(args) -> int:
    from moezoo.parity import run_parity

    results = run_parity(args.reference, args.folder)
    bad = [c for c in results if not c.ok]
    if bad:
        print(f"parity FAILED: {len(bad)} of {len(results)} outputs differ ({', '.join(c.name for c in bad)})",
              file=sys.stderr)
        return 1
    return 0


def _parse_options(items: list[str]) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item:
            raise CLIError(f"--option expects KEY=VALUE, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip()] = v
    return out


def cmd_convert(args) -> int:
    from moezoo.convert import available_converters, convert

    if args.list:
        for ref, kind in available_converters().items():
            print(f"{ref:<32}{kind}")
        return 0
    if not (args.reference and args.src and args.dst):
        raise CLIError("convert needs REFERENCE SRC DST (or --list)")
    options = _parse_options(args.option)
    if args.config:
        options["config"] = args.config
    if args.allow_pickle:
        options["allow_pickle"] = True
    dst = convert(args.reference, args.src, args.dst, **options)
    files = sorted(str(p.relative_to(dst)) for p in Path(dst).rglob("*") if p.is_file())
    print(f"converted {args.reference} {args.src} -> {dst} ({', '.join(files)})")
    return 0


def cmd_push(args) -> int:
    from moezoo.hub import push_to_hub

    push_to_hub(args.dir, args.repo_id, private=args.private, dry_run=args.dry_run, staging_dir=args.staging_dir,
                commit_message=args.commit_message, allow_pickle=args.allow_pickle)
    return 0


def cmd_bench(args) -> int:
    name = args.name.strip().lower().replace("_", "-")
    module_name = BENCHMARKS.get(name, "moezoo.bench_" + name.replace("-", "_"))
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise CLIError(f"benchmark {args.name!r} is not available (module {module_name} not found); known "
                           f"benchmarks: {', '.join(sorted(BENCHMARKS))}") from None
        raise
    if not hasattr(module, "main"):
        raise CLIError(f"{module_name} has no main(argv)")
    rc = module.main(list(args.args))
    return int(rc or 0)


def cmd_demo(args) -> int:
    from moezoo.demo import list_demo_steps, run_demo

    if args.list:
        for step in list_demo_steps():
            print(f"{step.name:<16}{step.description}")
        return 0
    run_demo(output_dir=args.output_dir, steps=args.steps, quick=args.quick, seed=args.seed)
    return 0


def find_script(kind: str, family: str, script: str) -> Path:
    """``training/<family>/train.py`` or ``eval/<family>/run.py`` of the checkout (package parent, then cwd)."""
    from moezoo.registry import list_families

    family = family.strip().replace("-", "_").lower()
    roots = [Path(__file__).resolve().parents[1], Path.cwd()]
    for root in roots:
        path = root / kind / family / script
        if path.is_file():
            return path
    found = sorted({d.name for r in roots if (r / kind).is_dir() for d in (r / kind).iterdir()
                    if (d / script).is_file()})
    hint = (f"families with a {kind}/<family>/{script}: {', '.join(found)}" if found else
            f"no {kind}/ folder found next to the package or in {Path.cwd()} (recipes ship with the source checkout)")
    known = "" if family in list_families() else f"; {family!r} is not a registered family"
    raise CLIError(f"no {kind}/{family}/{script}{known}; {hint}")


def _run_script(path: Path, argv: list[str]) -> int:
    import runpy

    old_argv = sys.argv
    sys.argv = [str(path), *argv]
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as exc:  # argparse --help / errors inside the script
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    finally:
        sys.argv = old_argv
    return 0


def cmd_train(args) -> int:
    return _run_script(find_script("training", args.family, "train.py"), list(args.args))


def cmd_eval(args) -> int:
    return _run_script(find_script("eval", args.family, "run.py"), list(args.args))


# ------------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moezoo", description="moezoo: a Mixture-of-Experts model zoo")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser("list", help="list registered models")
    s.add_argument("pattern", nargs="?", default="*", help="glob over names (default: all)")
    s.add_argument("--family", default=None, help="only this family (e.g. moezoo_lm)")
    s.add_argument("--pretrained", action="store_true", help="list names with hub weights")
    s.add_argument("--markdown", action="store_true", help="print the README table of families and models")
    s.add_argument("--update-readme", metavar="PATH", default=None, help="rewrite the generated table in PATH")
    s.set_defaults(fn=cmd_list)

    s = sub.add_parser("info", help="parameters (total / active), MoE layers and routers of a model")
    s.add_argument("name", help="a registered name or a save_pretrained folder")
    s.add_argument("--tiny", action="store_true", help="the tiny variant")
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("parity", help="check a reference folder against the official outputs")
    s.add_argument("reference", help="reference name (moezoo.parity.available_references())")
    s.add_argument("folder", help="folder with config.json, model.safetensors, io.safetensors, io.json")
    s.set_defaults(fn=cmd_parity)

    s = sub.add_parser("convert", help="convert an official checkpoint to a moezoo folder")
    s.add_argument("reference", nargs="?", help="reference name ('-' and '_' interchangeable)")
    s.add_argument("src", nargs="?", help="official checkpoint (folder or weights file)")
    s.add_argument("dst", nargs="?", help="output folder")
    s.add_argument("--config", default=None, help="official config.json when SRC is a bare weights file")
    s.add_argument("--allow-pickle", action="store_true", help="allow .bin/.pt/.pth (pickle) checkpoints")
    s.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="extra converter option (value parsed as JSON when possible); repeatable")
    s.add_argument("--list", action="store_true", help="list the references that can be converted")
    s.set_defaults(fn=cmd_convert)

    s = sub.add_parser("push", help="upload a save_pretrained folder to the Hugging Face Hub with a model card")
    s.add_argument("dir", help="folder written by save_pretrained")
    s.add_argument("repo_id", help="user/name")
    s.add_argument("--dry-run", action="store_true", help="write the folder that would be uploaded, upload nothing")
    s.add_argument("--private", action="store_true", help="create the repository as private")
    s.add_argument("--staging-dir", default=None, help="where to write the upload folder (default: a temp folder)")
    s.add_argument("--commit-message", default=None)
    s.add_argument("--allow-pickle", action="store_true", help="allow uploading pickled weights")
    s.set_defaults(fn=cmd_push)

    s = sub.add_parser("bench", help="run a speed benchmark (e.g. moe-layer)")
    s.add_argument("name", help=f"benchmark name ({', '.join(sorted(BENCHMARKS))})")
    s.add_argument("args", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    s.set_defaults(fn=cmd_bench)

    s = sub.add_parser("train", help="run a family's training recipe: training/<family>/train.py --config ...")
    s.add_argument("family", help="family name, e.g. time_moe, dit_moe, deweather")
    s.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the recipe (--config FILE key=value ...)")
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("eval", help="run a family's benchmark harness: eval/<family>/run.py ...")
    s.add_argument("family", help="family name, e.g. time_moe, dit_moe, deweather")
    s.add_argument("args", nargs=argparse.REMAINDER, help="arguments of the harness (see --help)")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("demo", help="offline end-to-end demo (trains lm_tiny_e8k2 on a CPU in ~2 minutes)")
    s.add_argument("--output-dir", default="outputs/demo")
    s.add_argument("--steps", nargs="*", default=None, help="demo steps to run (default: all; see --list)")
    s.add_argument("--quick", action="store_true", help="a few training steps only (smoke test)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--list", action="store_true", help="list the demo steps")
    s.set_defaults(fn=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("moezoo: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - one clear line for user errors
        from moezoo.parity import ParityError

        if os.environ.get("MOEZOO_DEBUG"):
            raise
        if isinstance(exc, (CLIError, ParityError, ValueError)):
            print(f"moezoo: error: {exc}", file=sys.stderr)
            return 2
        if isinstance(exc, (FileNotFoundError, KeyError, RuntimeError, OSError, ImportError)):
            msg = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
            print(f"moezoo: error: {type(exc).__name__}: {msg} (MOEZOO_DEBUG=1 shows the traceback)", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
