"""The asrfx command line: ``python -m asrfx`` or ``asrfx`` (inspect, convert, fuse, stripe)."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any

__all__ = ["main", "EXIT_OK", "EXIT_FAILURE", "EXIT_USAGE"]

EXIT_OK = 0
EXIT_FAILURE = 1  # the command ran and failed: a file, a model, tracing, nothing to convert
EXIT_USAGE = 2  # the command line itself is wrong: options, --input-shape, a spec's source prefix

_DESCRIPTION = """\
Inference-cost-free channel attention (ASR, ECCV 2024) from the command line.

  asrfx inspect --model torchvision:mobilenet_v3_large      channel-attention sites, as a table
  asrfx convert --model torchvision:mobilenet_v3_large -o asr.pt
  asrfx convert trained.pt --model timm:seresnet50 -o asr.pt   (a state_dict plus its architecture)
  asrfx convert --model asrfx:resnet56 --insert se -o asr.pt    (add ASR(SE) to a plain backbone)
  asrfx fuse asr.pt -o deployed.pt2                         (torch.export program: the plain backbone)
  asrfx fuse asr.pt -o deployed.pt                          (asrfx fused checkpoint, weights only)
  asrfx stripe --model timm:seresnet18 --data random --plot stripes.png

Model specs: torchvision:<name>, timm:<name>, asrfx:<name> (CIFAR ResNets: resnet56,
resnet110, resnet83, resnet164), always built with random weights (nothing is downloaded);
trained weights come from a state_dict file.
"""

_EPILOG = """\
Files are read with torch.load(weights_only=True): tensors and plain data, never code.
A file holding pickled objects (torch.save(model)) is refused unless --trust-pickle is
given, because loading it executes code from the file.

Exit status: 0 success, 1 the command failed (file, model, tracing, nothing to convert),
2 the command line is wrong. Errors are one line on stderr; --debug shows the traceback.
"""


class _Parser(argparse.ArgumentParser):
    """argparse with asrfx's one-line error format (exit status 2)."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"asrfx: error: {message} (see {self.prog} --help)\n")


class _Failure(Exception):
    """A command failed in a way the CLI itself detected (exit status 1)."""


class _Usage(_Failure):
    """A command line that cannot work, found after parsing (exit status 2)."""


# -- argument types -------------------------------------------------------------------------


def _input_shape(text: str) -> tuple[int, ...]:
    parts = re.split(r"\s*[,x]\s*", text.strip())  # 1,3,224,224 or 1x3x224x224
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if not shape or any(s <= 0 for s in shape):
        raise argparse.ArgumentTypeError(f"--input-shape takes positive sizes like 1,3,224,224, got {text!r}")
    from .checkpoint import input_shape_problem

    problem = input_shape_problem(shape)
    if problem:
        raise argparse.ArgumentTypeError(f"--input-shape {text!r}: {problem}")
    return shape


def _spec(text: str) -> str:
    from .specs import SpecError, parse_spec

    try:
        return str(parse_spec(text))
    except SpecError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str, most: int | None = None) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0 or (most is not None and value > most):
        limit = f" up to {most:,}" if most is not None else ""
        raise argparse.ArgumentTypeError(f"expected a positive integer{limit}, got {text!r}")
    return value


def _at_most(most: int):
    """A positive-integer argument type with an upper bound (what a checkpoint recipe may hold)."""
    return lambda text: _positive_int(text, most)


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


# -- the parser -----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    from .. import __version__
    from ..nn.attention import ATTENTION
    from .checkpoint import MAX_CLASSES, MAX_REPEATS

    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback on errors")

    source = _Parser(add_help=False)
    group = source.add_argument_group("model")
    group.add_argument("file", nargs="?", metavar="FILE",
                       help="a checkpoint: a state_dict (with --model), or an asrfx checkpoint written by "
                            "asrfx convert / fuse; a model spec here works like --model")
    group.add_argument("--model", "-m", type=_spec, metavar="SPEC",
                       help="the architecture: torchvision:<name>, timm:<name> or asrfx:<name> "
                            "(random weights unless FILE holds a state_dict for it)")
    group.add_argument("--num-classes", type=_at_most(MAX_CLASSES), metavar="N",
                       help="classifier size passed to the model builder (for state_dicts trained on other data)")
    group.add_argument("--input-shape", type=_input_shape, metavar="SHAPE",
                       help="example input, e.g. 1,3,224,224 (default: the model's own size: timm's config, "
                            "torchvision's crop size, 32x32 for asrfx:, the recipe's for asrfx checkpoints)")
    group.add_argument("--trust-pickle", action="store_true",
                       help="also load files holding pickled Python objects (a whole module saved with "
                            "torch.save(model), a torch.export program). This EXECUTES CODE FROM THE FILE: "
                            "use it only for files you trust")

    parser = _Parser(prog="asrfx", description=_DESCRIPTION, epilog=_EPILOG, parents=[common],
                     formatter_class=argparse.RawDescriptionHelpFormatter)
    location = Path(__file__).resolve().parents[1]  # the asrfx package folder
    parser.add_argument("--version", action="version", version=f"asrfx {__version__} from {location}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    inspect = commands.add_parser(
        "inspect", parents=[common, source], help="list the channel-attention sites (or a checkpoint's report)",
        description="Print the channel-attention sites of a model as a table; for an asrfx checkpoint, its "
                    "recipe and the convert or fuse report.")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")

    convert = commands.add_parser(
        "convert", parents=[common, source], help="rewrite attention into ASR (psi-driven) form for training",
        description="Convert every channel-attention block into ASR form (psi replaces the pooled statistic) "
                    "and write an asrfx.asr/1 checkpoint: plain data (recipe + state_dict), safe to load, from "
                    "which the converted model is rebuilt: asrfx.checkpoint.load(path).model",
        epilog="Train the result in Python: loaded = asrfx.checkpoint.load('asr.pt'); train loaded.model; "
               "asrfx.checkpoint.save_asr('asr.pt', loaded.model, loaded.recipe). Then: asrfx fuse asr.pt -o ...")
    convert.add_argument("-o", "--output", required=True, type=Path, metavar="OUT", help="the asrfx.asr/1 file")
    mode = convert.add_mutually_exclusive_group()
    mode.add_argument("--keep", action="store_true",
                      help="keep the original attention and add a psi-driven copy before it (ASR(k) + k)")
    mode.add_argument("--insert", choices=sorted(ATTENTION), metavar="ATTENTION",
                      help=f"add attention to a plain backbone instead ({', '.join(sorted(ATTENTION))})")
    convert.add_argument("--repeats", type=_at_most(MAX_REPEATS), default=1, metavar="N",
                         help="with --insert: modules in a row at each place (the paper's delta)")
    convert.add_argument("--psi-init", type=_finite_float, default=0.1, metavar="FLOAT",
                         help="initial value of psi (default 0.1, the paper's C_0.1)")

    fuse = commands.add_parser(
        "fuse", parents=[common], help="fold the constant gates away: the plain backbone, for deployment",
        description="Fold every ASR gate of an asrfx.asr/1 checkpoint into the backbone and write the deployed "
                    "model. The output format follows OUT's suffix:\n"
                    "  .pt2  a torch.export program with a dynamic batch size: run it with only torch, no model "
                    "code (torch.export.load(path).module()); torch.export.load unpickles parts of the file, so "
                    "load only files you made.\n"
                    "  other (.pt)  an asrfx.fused/1 checkpoint: plain data, loadable with weights_only=True; "
                    "recipe + the ASR weights fuse started from + the fused state_dict; rebuilt with "
                    "asrfx.checkpoint.load(path).model (needs asrfx and the model's library).",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    fuse.add_argument("file", metavar="FILE", help="an asrfx.asr/1 checkpoint written by asrfx convert")
    fuse.add_argument("-o", "--output", required=True, type=Path, metavar="OUT", help="deployed.pt2 or deployed.pt")
    fuse.add_argument("--input-shape", type=_input_shape, metavar="SHAPE",
                      help="example input (default: the checkpoint's)")
    fuse.add_argument("--trust-pickle", action="store_true",
                      help="also load a pickled module (EXECUTES CODE FROM THE FILE; only for files you trust)")

    stripe = commands.add_parser(
        "stripe", parents=[common, source], help="observe the stripes: attention outputs across inputs",
        description="Run the model on data and report, per attention site, how much its per-channel output "
                    "varies across inputs (the paper's Stripe Observation, section 1 and Fig. 1).")
    stripe.add_argument("--data", choices=("random", "fashion-mnist"), default="random",
                        help="random inputs, or Fashion-MNIST test images resized and replicated to the model's "
                             "input shape (apt-get install dataset-fashion-mnist, or set ASRFX_FASHION_MNIST)")
    stripe.add_argument("--batches", type=_positive_int, default=4, metavar="N", help="batches to run (default 4)")
    stripe.add_argument("--batch-size", type=_positive_int, default=16, metavar="B", help="default 16")
    stripe.add_argument("--plot", type=Path, metavar="PNG", help="also draw the stripes to this image")
    stripe.add_argument("--no-progress", action="store_true", help="no progress output")
    return parser


# -- commands -------------------------------------------------------------------------------


def _load(args):
    """The model that FILE and --model name (a spec in FILE's place counts as --model)."""
    from .checkpoint import load

    file, spec = args.file, getattr(args, "model", None)
    if file and not Path(file).exists() and re.match(r"^(torchvision|timm|asrfx):", file):
        if spec is not None:
            raise _Usage(f"two models given: {file} and --model {spec}")
        file, spec = None, _spec(file)  # a spec in FILE's place
    if file is None and spec is None:
        raise _Usage("give a checkpoint FILE or --model SPEC (e.g. --model torchvision:mobilenet_v3_large)")
    model_kwargs = {"num_classes": args.num_classes} if args.num_classes else {}
    return load(file, model=spec, model_kwargs=model_kwargs, input_shape=args.input_shape,
                trust_pickle=args.trust_pickle)


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _shape(shape) -> str:
    return "x".join(map(str, shape))


def _site_json(site) -> dict[str, Any]:
    return {"module": site.module_path, "kind": str(site.kind), "channels": site.channels,
            "gate_shape": list(site.gate_shape), "gated_branches": len(site.uses),
            "absorbable": site.absorbable, "fold_target": site.absorption.reason}


def _inspect(args) -> int:
    from dataclasses import asdict

    from ..api import find_attention, report_of

    loaded = _load(args)
    info: dict[str, Any] = {"source": loaded.source, "kind": loaded.kind, "input_shape": list(loaded.input_shape),
                            "parameters": _count(loaded.model)}
    if loaded.kind in ("asr", "fused"):
        report = report_of(loaded.model)
        info["recipe"] = loaded.recipe.to_dict()
        if args.json:
            key = "converted" if loaded.kind == "asr" else "folds"
            info[key] = [asdict(s) for s in (report.sites if loaded.kind == "asr" else report.folds)]
            print(json.dumps(info, indent=2))
            return EXIT_OK
        fmt = "asrfx.asr/1 (ASR form, for training)" if loaded.kind == "asr" else "asrfx.fused/1 (deployed)"
        print(f"{loaded.source}: {fmt} checkpoint of {loaded.recipe.describe()}")
        print(report)
        print(f"\n{info['parameters']:,} parameters")
        return EXIT_OK
    if loaded.kind == "export":  # aten-level graphs are not what detection reads: summarise instead
        if args.json:
            print(json.dumps(info, indent=2))
        else:
            print(f"{loaded.source}: torch.export program (deployed), example input {_shape(loaded.input_shape)}, "
                  f"{info['parameters']:,} parameters; asrfx finds attention in nn.Modules, not in exported graphs")
        return EXIT_OK
    sites = find_attention(loaded.model.eval(), (loaded.example(),))
    if args.json:
        info.update(model=sites.model_name, graph_nodes=len(sites.graph_module.graph.nodes),
                    sites=[_site_json(s) for s in sites],
                    rejections=[{"module": r.module_path, "reason": r.reason, "verdict": str(r.verdict)}
                                for r in sites.rejections],
                    layout_losses=[{"module": loss.module_path, "node": loss.node.name, "op": loss.op,
                                    "tensors": loss.tensors} for loss in sites.layout_losses],
                    leaves=[{"module": leaf.path, "type": leaf.module_type, "reason": leaf.reason}
                            for leaf in sites.leaves])
        print(json.dumps(info, indent=2))
        return EXIT_OK
    print(sites)
    print(f"\n{loaded.source}, input {_shape(loaded.input_shape)}: {info['parameters']:,} parameters")
    return EXIT_OK


def _not_plain(loaded, command: str) -> None:
    """Refuse models that a command has nothing to do with (stripe also measures ASR forms)."""
    if loaded.kind == "asr" and command == "convert":
        raise _Failure(f"{loaded.source} is already in ASR form (asrfx.asr/1); fuse it: "
                       f"asrfx fuse {loaded.source} -o deployed.pt2")
    if loaded.kind in ("fused", "export"):
        raise _Failure(f"{loaded.source} is a fused (deployed) model, with no attention left to {command}")


def _convert(args) -> int:
    from ..api import report_of
    from ..passes.contract import psi_parameters
    from .checkpoint import Recipe, apply_recipe, save_asr

    _check_output(args.output)
    loaded = _load(args)
    _not_plain(loaded, "convert")
    if args.insert:
        options = {"attention": args.insert, "repeats": args.repeats, "psi_init": args.psi_init}
    else:
        options = {"keep": args.keep, "psi_init": args.psi_init}
    recipe = Recipe(loaded.spec, loaded.input_shape, "insert" if args.insert else "convert", options,
                    loaded.model_kwargs)
    gm = apply_recipe(loaded.model, recipe)
    report = report_of(gm)
    if not report.sites:
        why = "".join(f"; {path or '(top level)'}: {reason}" for path, reason in report.skipped)
        if args.insert:
            raise _Failure(f"found no place to insert {args.insert} in {loaded.source}{why}")
        raise _Failure(f"no channel-attention site in {loaded.source}, nothing to convert{why}; to add "
                       "attention to a plain backbone, use --insert se (or eca, srm, ...)")
    print(report)
    psi = sum(p.numel() for _, p in psi_parameters(gm))
    _write(lambda: save_asr(args.output, gm, recipe, module=loaded.model if loaded.spec is None else None),
           args.output)
    print(f"\n{_count(loaded.model):,} parameters -> {_count(gm):,} in ASR form ({psi:,} in psi)")
    print(f"wrote {args.output} (asrfx.asr/1: {recipe.describe()})")
    return EXIT_OK


def _fuse(args) -> int:
    from ..api import fuse, report_of
    from .checkpoint import ArchitectureNeededError, load, save_export, save_fused

    _check_output(args.output)
    try:
        loaded = load(args.file, input_shape=args.input_shape, trust_pickle=args.trust_pickle)
    except ArchitectureNeededError:
        raise _Failure(f"{args.file} is a plain state_dict; fuse takes the output of asrfx convert "
                       "(asrfx convert FILE --model SPEC -o asr.pt, train, then asrfx fuse asr.pt)") from None
    if loaded.kind in ("fused", "export"):
        _not_plain(loaded, "fuse")
    to_export = args.output.suffix == ".pt2"
    if loaded.kind == "module" and not to_export:
        raise _Failure(f"{args.file} is a pickled module with no recipe to rebuild it from: write a "
                       "torch.export program instead (-o deployed.pt2)")
    asr = loaded.model.eval()
    fused = fuse(asr, (loaded.example(),))
    report = report_of(fused)
    print(report)
    if to_export:
        note = _write(lambda: save_export(args.output, fused, loaded.input_shape), args.output)
        what = f"torch.export program, {note}; load it with torch.export.load"
    else:
        _write(lambda: save_fused(args.output, fused, asr.state_dict(), loaded.recipe), args.output)
        what = "asrfx.fused/1 checkpoint; load it with asrfx.checkpoint.load"
    backbone = _backbone_parameters(loaded.recipe)
    line = f"\ndeployed model: {_count(fused):,} parameters (ASR form {_count(asr):,})"
    if backbone is not None:
        line += f"; plain backbone {backbone:,}" + (" (equal)" if backbone == _count(fused) else "")
    print(line + f"\n{report.verdict(_count(fused), backbone)}")
    print(f"wrote {args.output} ({what})")
    return EXIT_OK


def _backbone_parameters(recipe) -> int | None:
    """Parameters of the model fuse should give back: the spec's model without its attention
    (replace mode), with it (keep mode: ASR(k) + k deploys k), as it is (insert)."""
    if recipe is None or recipe.model is None:
        return None
    from ..api import backbone
    from ..errors import AsrfxError
    from .specs import build_model

    model = build_model(recipe.model, **recipe.model_kwargs).eval()
    if recipe.method == "convert" and not recipe.options.get("keep"):
        try:
            model = backbone(model, (recipe.example(),))
        except AsrfxError:  # attention that cannot simply be removed: no reference count to print
            return None
    return _count(model)


def _check_output(path: Path) -> None:
    """Before any work: a folder to write into."""
    if not path.parent.is_dir():
        raise _Failure(f"cannot write {path}: folder {path.parent} does not exist")
    if path.is_dir():
        raise _Failure(f"cannot write {path}: it is a folder")


def _write(save, path: Path):
    _check_output(path)
    try:
        return save()
    except OSError as exc:
        raise _Failure(f"cannot write {path}: {exc.strerror or exc}") from None


def _data(kind: str, shape: tuple[int, ...], batches: int, batch_size: int):
    """Input batches shaped like the model's input: a list of tensors."""
    import torch

    batch_shape = (batch_size, *shape[1:])
    if kind == "random":
        gen = torch.Generator().manual_seed(0)
        return [torch.randn(batch_shape, generator=gen) for _ in range(batches)]
    from ..data import load_fashion_mnist

    if len(shape) != 4:
        raise _Failure(f"--data fashion-mnist makes images; the model's input shape {_shape(shape)} is not N,C,H,W")
    try:
        images, _ = load_fashion_mnist("test", limit=batches * batch_size)
    except FileNotFoundError as exc:
        raise _Failure(str(exc)) from None
    # 28x28 grey images -> the model's size and channel count, centred like normalised photos
    images = torch.nn.functional.interpolate(images, size=tuple(shape[2:]), mode="bilinear", align_corners=False)
    images = ((images - 0.5) / 0.25).expand(-1, shape[1], -1, -1).contiguous()
    return [images[i:i + batch_size] for i in range(0, len(images), batch_size)]


def _stripe(args) -> int:
    from ..api import stripe

    if args.plot:
        _check_output(args.plot)
    loaded = _load(args)
    _not_plain(loaded, "stripe")
    data = _data(args.data, loaded.input_shape, args.batches, args.batch_size)
    stats = stripe(loaded.model.eval(), data, (loaded.example(),), max_batches=args.batches,
                   progress=not args.no_progress)
    print(stats)
    if args.plot:
        _write(lambda: stats.plot(args.plot), args.plot)
        print(f"wrote {args.plot}")
    return EXIT_OK


_COMMANDS = {"inspect": _inspect, "convert": _convert, "fuse": _fuse, "stripe": _stripe}


# -- entry point ----------------------------------------------------------------------------


def _one_line(exc: BaseException) -> str:
    return " ".join(line.strip() for line in str(exc).splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 failure, 2 usage)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version, usage errors
        return stop.code if isinstance(stop.code, int) else EXIT_USAGE
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    from ..errors import AsrfxError

    try:
        return _COMMANDS[args.command](args)
    except BrokenPipeError:  # output piped into head & co.: stop quietly, as other tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_FAILURE
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("asrfx: interrupted", file=sys.stderr)
        return 130
    except (_Failure, AsrfxError) as exc:
        if args.debug:
            raise
        print(f"asrfx: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, _Usage) else EXIT_FAILURE
    except Exception as exc:  # a bug or an unforeseen input: still one line, the traceback on request
        if args.debug:
            raise
        print(f"asrfx: error: {type(exc).__name__}: {_one_line(exc)} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    raise SystemExit(main())
