"""The ``regfw`` command line (also ``python -m regfw``).

Errors a user can fix print one line and exit 2; ``--debug`` shows the traceback instead.
Plugins are loaded only by the commands that need them, so a broken plugin never breaks
``regfw --help``.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from collections.abc import Callable, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, NoReturn

from regfw import __version__
from regfw.cli import startup
from regfw.errors import RegfwError, RunInterrupted, Terminated
from regfw.run import stopping
from regfw.run.console import quiet_lightning


def _config(args: argparse.Namespace):
    from regfw.config.schema import load_config

    return load_config(args.config, args.overrides)


# -- commands ---------------------------------------------------------------------------------


def cmd_fit(args: argparse.Namespace) -> int:
    resume = args.resume
    if resume is not None and "=" in resume and not Path(resume).exists():
        args.overrides.append(resume)  # `--resume key=value`: an override, not a checkpoint
        resume = ""
    if resume is None:
        cfg = _config(args)
    else:
        from regfw.run.job import load_resume_config

        cfg = load_resume_config(args.config, args.overrides, resume or None, args.run_dir)
    import pytorch_lightning  # noqa: F401 - it too, before the collector resumes

    from regfw.run.job import fit  # after the config: its errors come before torch and Lightning are imported

    startup.resume()

    result = fit(cfg, run_dir=args.run_dir, resume=(resume or True) if resume is not None else None,
                 force=args.force)
    if result.rank != 0:
        return 0
    try:
        from regfw.cli.summary import format_files, format_metrics

        metrics = format_metrics(result.metrics, cfg.uncertainty.samples)
        print(("\n" + metrics if metrics else "") + "\n\n" + format_files(result))
    except (Terminated, KeyboardInterrupt) as exc:  # the run is complete: only the report was cut short
        signum = stopping.signal_of(exc) or signal.SIGTERM
        state = stopping.RunState(signum, cfg.source, run_dir=result.run_dir, checkpoint=result.checkpoint,
                                  finished=True, during="while printing the report",
                                  max_epochs=cfg.trainer.get("max_epochs"))
        raise RunInterrupted(stopping.message(state), exit_code=stopping.EXIT_STATUS[signum]) from None
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    cfg = _config(args)  # first: the errors found without torch come before it is imported
    from regfw.build.parts import build_plan  # no Lightning: the plan alone answers in about a second

    startup.resume()  # a large model's tracing makes garbage: collect it, skipping the start-up objects

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = build_plan(cfg)
    shown = set(plan.warnings)  # printed as "warning:" lines of the plan below
    for w in caught:
        if str(w.message) not in shown:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    print(plan)  # str(plan) is the table: what Regularize(...).plan_for(module) returns prints the same
    for line in mc_sampling_lines(cfg, plan):
        print(line)
    return 0


def mc_sampling_lines(cfg: Any, plan: Any) -> list[str]:
    """What Monte Carlo dropout will sample of the model's own stochastic layers, when the config has
    uncertainty on (see regfw/uncertainty/own_layers.py)."""
    unc = getattr(cfg, "uncertainty", None)
    if unc is None or not getattr(unc, "enabled", False):
        return []
    from regfw.uncertainty.own_layers import listing, own_layers, plan_kinds

    mm = plan.context.model_map
    if mm is None:
        return []
    setting = unc.sample_model_stochastic
    return listing(own_layers(mm.model, setting, plan_kinds(plan.rows()), mm.attention), setting)


def cmd_plugins(args: argparse.Namespace) -> int:
    if args.check:
        return _check_plugins()
    from regfw.registry.discovery import installed_plugins

    installed, unknown = installed_plugins()  # entry-point metadata: nothing is imported
    for item in installed:
        origin = "built-in" if item.builtin else item.distribution
        skipped = "" if item.selected else "; not loaded: REGFW_LOAD_PLUGINS leaves it out"
        print(f"{item.key} {item.version or ''} ({origin}; module {item.module}{skipped})".replace("  ", " "))
    builtin = sum(1 for item in installed if item.builtin)
    print(f"{len(installed)} plugins ({builtin} built-in, {len(installed) - builtin} third-party), from their "
          f"entry points; `regfw plugins --check` imports them and lists the regularizers each provides")
    for failure in unknown:
        print(f"regfw plugins: error: {failure.message()}", file=sys.stderr)
    return 1 if unknown else 0


def _check_plugins() -> int:
    """``regfw plugins --check``: import every plugin, list its hooks and regularizers, and the
    plugins that fail (exit 1)."""
    from regfw.registry.discovery import PluginWarning, plugin_failures, plugin_infos
    from regfw.registry.regularizers import get_registry

    with warnings.catch_warnings():  # the failures are listed at the end instead
        warnings.simplefilter("ignore", PluginWarning)
        registry = get_registry()
        infos = plugin_infos()
        failures = plugin_failures()
    for info in infos:
        provides = [registry.selection_name(s) for s in registry.all_specs() if s.plugin == info.name]
        origin = "built-in" if info.builtin else (info.distribution or "registered at run time")
        print(f"{info.name} {info.version or ''} ({origin}; module {info.module})".replace("  ", " "))
        print(f"  hooks:        {', '.join(info.hooks) or '-'}")
        print(f"  regularizers: {', '.join(provides) or '-'}")
        for name in provides:
            desc = registry.specs[name].cls.description
            if desc:
                print(f"    {name}: {desc}")
    shared = sorted({s.name for s in registry.all_specs() if len(registry.providers(s.name)) > 1})
    for name in shared:  # not an error: each is selected by its qualified name
        choices = " or ".join(s.qualified_name for s in registry.providers(name))
        print(f"shared name {name!r}: select {choices} in regularizers:; {name!r} alone selects none")
    for failure in failures:
        print(f"regfw plugins: error: {failure.message()}", file=sys.stderr)
    return 1 if failures else 0


def cmd_init(args: argparse.Namespace) -> int:
    from regfw.run.atomic import write_output

    path = Path(args.path)
    text = resources.files("regfw_templates").joinpath("starter.yaml").read_text()
    write_output(path, text, force=args.force)  # never over a file without --force, nor over a non-file
    print(f"wrote {path}; train with: regfw fit {path}")
    return 0


def cmd_new_plugin(args: argparse.Namespace) -> int:
    from regfw.cli.new_plugin import new_plugin

    made = new_plugin(args.name, args.dir)
    print(f"wrote {made.path}/ (regularizer {made.name!r}):")
    for rel in made.files:
        print(f"  {rel}")
    print(f"next: cd {made.path} && pip install -e . && regfw plugins --check && python -m pytest tests")
    return 0


def cmd_rank(args: argparse.Namespace) -> int:
    from regfw.cli.rank import rank_checkpoint

    startup.resume()

    ranked = rank_checkpoint(args.config, args.checkpoint, args.overrides, k=args.k,
                             acquisition=args.acquisition, split=args.split, samples=args.samples)
    print(f"top {len(ranked.indices)} of the {args.split} split by {args.acquisition} (index, score):")
    for index, score in zip(ranked.indices.tolist(), ranked.scores.tolist(), strict=True):
        print(f"{index}\t{score:.6f}")
    if ranked.referred:
        from regfw.cli.finite_inputs import format_rows

        print(f"referred for review, not ranked ({len(ranked.referred)}: non-finite model output): "
              f"{format_rows(ranked.referred)}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from regfw.cli.predict import predict_checkpoint

    startup.resume()

    path, rows = predict_checkpoint(args.config, args.checkpoint, args.overrides, out=args.out, split=args.split,
                                    samples=args.samples, force=args.force)
    referred = sum(1 for r in rows if r["refer"])
    rule = rows[0]["rule"] if rows else "-"
    columns = list(rows[0]) if rows else []
    print(f"wrote {path}: {len(rows)} predictions, {referred} referred for human review ({rule}); one row per "
          f"input, {len(columns)} columns: {', '.join(columns)}")
    return 0


def cmd_test(args: argparse.Namespace) -> int:
    from regfw.cli.testing import test_checkpoint

    startup.resume()

    result = test_checkpoint(args.config, args.checkpoint, args.overrides, out=args.out, samples=args.samples,
                             force=args.force)
    for name, value in result.metrics.items():
        print(f"{name}: {value:.6g}")
    print(f"wrote {result.path}: {len(result.metrics)} test metrics")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import pytorch_lightning  # noqa: F401 - it too, before the collector resumes

    from regfw.cli.demo import run_demo
    from regfw.run import job  # noqa: F401 - imported before the collector resumes (regfw.cli.startup)

    startup.resume()

    return run_demo(args.config, args.overrides)


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str]] = {
    "fit": (cmd_fit, "train a config in a new run directory, or continue a run with --resume"),
    "plan": (cmd_plan, "print what the regularizers would insert, and why, without training"),
    "plugins": (cmd_plugins, "list the installed plugins (--check: import them, list their regularizers)"),
    "init": (cmd_init, "write a commented starter config"),
    "demo": (cmd_demo, "train with and without the regularizers and compare"),
    "rank": (cmd_rank, "rank samples for labelling by MC dropout uncertainty (active learning)"),
    "predict": (cmd_predict, "MC dropout predictions of a checkpoint: one row per input, with its review decision"),
    "test": (cmd_test, "the test split through a checkpoint: the MC dropout metrics, written to its run directory"),
    "new-plugin": (cmd_new_plugin, "generate a ready-to-install plugin package regfw-NAME/"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="regfw", description="Regularization and MC dropout uncertainty for PyTorch Lightning.")
    parser.add_argument("--version", action="version", version=f"regfw {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    parsers = {name: sub.add_parser(name, help=help_, description=help_) for name, (_, help_) in COMMANDS.items()}

    for name in ("fit", "plan", "demo"):
        p = parsers[name]
        p.add_argument("config", nargs="?" if name == "demo" else None,
                       default=None,
                       help="YAML config file" + (" (default: the packaged demo config)" if name == "demo" else ""))
        p.add_argument("overrides", nargs="*", help="dotted KEY=VALUE overrides, e.g. trainer.max_epochs=3")
    parsers["plugins"].add_argument(
        "--check", action="store_true",
        help="import every plugin (and torch): list the hooks and regularizers each provides, and the plugins "
             "that fail to load (exit 1)")
    parsers["fit"].add_argument("--run-dir", help="use this (new or empty) directory instead of a generated one")
    parsers["fit"].add_argument(
        "--resume", nargs="?", const="", metavar="CHECKPOINT",
        help="continue a run: from CHECKPOINT, or from checkpoints/last.ckpt of the newest run of this config "
             "(or of --run-dir), in that run's directory")
    parsers["fit"].add_argument("--force", action="store_true",
                                help="replace the --run-dir directory when it holds an earlier regfw run")
    for name in ("fit", "rank", "predict", "test"):  # the commands that load a checkpoint
        parsers[name].add_argument("--accept-unverified", action="store_true",
                                   help="load a regfw checkpoint whose digest is missing or no longer matches its "
                                        "content (edited or damaged), with a notice")
        parsers[name].add_argument("--accept-version", action="store_true",
                                   help="load a checkpoint written by another regfw version, with a notice")
    parsers["init"].add_argument("path", nargs="?", default="regfw.yaml", help="where to write (default regfw.yaml)")
    parsers["init"].add_argument("--force", action="store_true",
                                 help="overwrite an existing file (a regular file only, never a device or link)")
    rank = parsers["rank"]
    rank.add_argument("config", help="the run's YAML config (for the data)")
    rank.add_argument("checkpoint", help="a checkpoint written by `regfw fit`")
    rank.add_argument("overrides", nargs="*", help="dotted KEY=VALUE overrides")
    rank.add_argument("--k", type=int, default=50, help="how many samples to return (default 50)")
    rank.add_argument("--acquisition", default="bald", choices=["bald", "entropy", "variation_ratio", "random"])
    rank.add_argument("--split", default="val", choices=["val", "train"], help="the pool to rank (default val)")
    rank.add_argument("--samples", type=int, default=30, help="MC samples per input (default 30)")
    predict = parsers["predict"]
    predict.add_argument("config", help="the run's YAML config (data and uncertainty settings)")
    predict.add_argument("checkpoint", help="a checkpoint written by `regfw fit` (or with regfw.Regularize)")
    predict.add_argument("overrides", nargs="*", help="dotted KEY=VALUE overrides, e.g. uncertainty.threshold=0.2")
    predict.add_argument("--out", required=True, help="the table to write: .csv, or .parquet (needs pyarrow)")
    predict.add_argument("--split", default="val", choices=["val", "train", "predict"],
                         help="the inputs (default: the data module's predict_dataloader when it has one, else val)")
    predict.add_argument("--samples", type=int, default=None, help="MC samples per input (default uncertainty.samples)")
    predict.add_argument("--force", action="store_true", help="replace an existing --out file (a regular file only)")
    test = parsers["test"]
    test.add_argument("config", help="the run's YAML config (data and uncertainty settings)")
    test.add_argument("checkpoint", help="a checkpoint written by `regfw fit`")
    test.add_argument("overrides", nargs="*", help="dotted KEY=VALUE overrides, e.g. uncertainty.samples=100")
    test.add_argument("--out", default=None,
                      help="the JSON file to write (default: test_metrics.json in the checkpoint's run directory)")
    test.add_argument("--samples", type=int, default=None, help="MC samples per input (default uncertainty.samples)")
    test.add_argument("--force", action="store_true", help="replace an existing metrics file (a regular file only)")
    parsers["new-plugin"].add_argument("name", help="the plugin and regularizer name, a lowercase identifier")
    parsers["new-plugin"].add_argument("--dir", default=".", help="where to create regfw-NAME/ (default: here)")
    return parser


class _Parser(argparse.ArgumentParser):
    """argparse with usage errors on one line (``regfw fit: error: ...; see regfw fit --help``)."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{self.prog}: error: {message}; see `{self.prog} --help`")


class _UsageError(Exception):
    pass


def _one_line(text: str, prefix: str) -> str:
    """``text`` as one line, without a repeated ``regfw CMD:`` prefix."""
    text = " ".join(str(text).split())
    while text.startswith(prefix):
        text = text[len(prefix):].lstrip()
    return text


def _signal_line(args: argparse.Namespace, exc: BaseException) -> tuple[str, int]:
    """The line and exit status for a SIGTERM or SIGINT that no later step turned into a
    :class:`~regfw.errors.RunInterrupted` (``regfw fit`` does from the moment it claims a run
    directory): for ``fit``, nothing was written yet."""
    signum = stopping.signal_of(exc) or signal.SIGTERM
    if args.command != "fit":
        return ("stopped by SIGTERM" if signum == signal.SIGTERM else "interrupted (SIGINT)"), \
            stopping.EXIT_STATUS[signum]
    state = stopping.RunState(signum, args.config, resume=args.resume is not None)
    return "error: " + stopping.message(state), stopping.EXIT_STATUS[signum]


def main(argv: Sequence[str] | None = None) -> int:
    """The ``regfw`` command line; returns its exit status.

    SIGTERM and SIGINT are handled from the first line on (:mod:`regfw.run.stopping`). With ``argv``
    None (the process's own command line) the handlers stay once the command has finished, so a
    signal while the process exits changes nothing; with ``argv`` given (a caller inside a longer
    process) the previous handlers are put back.
    """
    restore = stopping.install()
    startup.pause(own_process=argv is None)
    try:
        return _main(argv)
    finally:
        startup.resume()
        stopping.hold()
        if argv is not None:
            restore()


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # overrides after an option, e.g. `fit CONFIG --resume CKPT trainer.max_epochs=5`
            if not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra):
                parser.error(f"unrecognized arguments: {' '.join(extra)}")
            args.overrides = [*args.overrides, *extra]
    except _UsageError as exc:
        stopping.hold()
        print(str(exc), file=sys.stderr)
        return 2
    except (Terminated, KeyboardInterrupt) as exc:
        stopping.hold()
        print(f"regfw: {'stopped by SIGTERM' if isinstance(exc, Terminated) else 'interrupted (SIGINT)'}",
              file=sys.stderr)
        return stopping.EXIT_STATUS[stopping.signal_of(exc) or signal.SIGTERM]
    handler = COMMANDS[args.command][0]
    prefix = f"regfw {args.command}:"
    try:
        from regfw.run.checkpoint_trust import accepting

        with accepting(getattr(args, "accept_unverified", False), getattr(args, "accept_version", False)), \
                quiet_lightning():  # a command's own report (or its one error line) is its output
            code = handler(args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        stopping.hold()
        return code
    except RegfwError as exc:
        stopping.hold()
        if args.debug:
            raise
        if not exc.quiet:  # other ranks of a multi-process run leave it to rank 0
            print(f"{prefix} error: {_one_line(str(exc), prefix)}", file=sys.stderr)
        return exc.exit_code
    except (Terminated, KeyboardInterrupt) as exc:
        stopping.hold()
        line, code = _signal_line(args, exc)
        print(f"{prefix} {line}", file=sys.stderr)
        return code
    except BrokenPipeError:
        stopping.hold()
        # the reader went away (`regfw plugins | head`): stop quietly, as CLI tools do
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE
    except Exception as exc:  # noqa: BLE001 - one clear line; --debug for the traceback
        stopping.hold()
        if args.debug:
            raise
        from regfw.registry.blame import plugin_error

        blamed = plugin_error(exc, f"during `regfw {args.command}`")
        if blamed is not None:  # a plugin's code raised: named, exit 2 like every other plugin failure
            print(f"{prefix} error: {_one_line(str(blamed), prefix)}", file=sys.stderr)
            return blamed.exit_code
        print(f"{prefix} error: {type(exc).__name__}: {_one_line(str(exc), prefix)} (run `regfw --debug "
              f"{args.command} ...` for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
