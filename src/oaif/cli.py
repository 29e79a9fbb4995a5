"""The ``oaif`` command line.

    oaif train CONFIG [key.sub=value ...]     run online (or offline) training
    oaif annotate ...                         label a file of pairs and write a preference file
    oaif eval ...                             win rate against a baseline, plots and a report
    oaif expo --base B --aligned A --alpha X --out DIR   ExPO: extrapolate an aligned model from its base
    oaif plot RUN_DIR [--out DIR]             PNGs of a run's metrics over its steps, and a Markdown page
    oaif config show CONFIG [key=value ...]   print the resolved config
    oaif config keys                          list every config key with its help

Errors in the user's input print one line, ``oaif: error: ...``, and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from oaif.errors import OaifError
from oaif.redaction import RedactingFilter, redact_text, remember


def _train(args: argparse.Namespace) -> int:
    from oaif.config import load_config

    cfg = load_config(args.config, args.overrides)
    remember(cfg.to_dict())  # credentials in its URLs are redacted from here on
    from oaif.run.loop import summary_text
    from oaif.trainer import train

    summary = train(cfg)
    if summary["main"]:  # with several processes, one summary
        print(summary_text(summary))
    return 0


def _config(args: argparse.Namespace) -> int:
    from oaif.config import describe, dump_yaml, load_config

    if args.action == "keys":
        print(describe())
    else:
        print(redact_text(dump_yaml(load_config(args.config, args.overrides))), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from oaif import __version__

    parser = argparse.ArgumentParser(prog="oaif", description="Align language models with online AI feedback.")
    parser.add_argument("--version", action="version", version=f"oaif {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a policy with online AI feedback (or offline preferences)",
                       description="Train with online AI feedback. Overrides take the form key.sub=value, "
                                   "e.g. train.max_steps=3 loss.type=ipo. `oaif config keys` lists every key.")
    p.add_argument("config", help="YAML config file (see configs/)")
    p.add_argument("overrides", nargs="*", default=[], help="key.sub=value overrides")  # default: not "required"
    p.set_defaults(func=_train)

    from oaif.commands import annotate as annotate_cmd
    from oaif.commands import eval as eval_cmd
    from oaif.commands import expo as expo_cmd
    from oaif.commands import plot as plot_cmd

    for name, cmd, help_text in (
            ("annotate", annotate_cmd,
             "label pairs (or sampled pairs) with an annotator; compare with human labels"),
            ("eval", eval_cmd, "win rate of a model (or a run's checkpoints) against another, with a report"),
            ("expo", expo_cmd, "ExPO: write aligned + alpha * (aligned - base) as a model directory"),
            ("plot", plot_cmd, "PNGs of a run's metrics over its steps (loss, KL, length, judge, pairs, time)")):
        p = sub.add_parser(name, help=help_text, description=cmd.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        cmd.add_arguments(p)
        p.set_defaults(func=cmd.run)

    p = sub.add_parser("config", help="show a resolved config, or list every key with its help")
    p.add_argument("action", choices=["show", "keys"])
    p.add_argument("config", nargs="?", help="YAML config file (for show)")
    p.add_argument("overrides", nargs="*", default=[], help="key.sub=value overrides")
    p.set_defaults(func=_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for handler in logging.getLogger().handlers:
        handler.addFilter(RedactingFilter())
    from oaif.run.stop_signals import stop_during_setup

    stop_during_setup()  # a run's own handlers take over once it starts stepping
    try:
        return args.func(args)
    except OaifError as e:
        _say(f"oaif: error: {e}")
        return 2
    except KeyboardInterrupt:
        _say("oaif: interrupted")
        return 130
    except BaseException as e:
        from oaif.run.stop_signals import Stopped

        if not isinstance(e, Stopped):
            raise
        _say(f"oaif: {e}")
        return e.exit_code


def _say(line: str) -> None:
    """One line to stderr in a single write, so the lines of processes sharing a pipe never interleave."""
    sys.stderr.write(redact_text(line) + "\n")
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())


