"""``insloc pretrain``: the flags are generated from the fields of insloc.config.Config.

    insloc pretrain --preset demo
    insloc pretrain --preset insloc-r50-fpn --data /data/imagenet/train --out-dir runs/fpn200
    insloc pretrain --preset insloc-r50-c4 --config my.yaml --epochs 400 --resume auto

Precedence: preset < --config YAML (a mapping of Config field names) < flags.
"""
import argparse
import dataclasses
import os
import sys
import types
import typing

from .config import PRESETS, Config, UsageError


def _add_field(parser, f, hint):
    flag = "--" + f.name.replace("_", "-")
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    kw = {"dest": f.name, "default": argparse.SUPPRESS,
          "help": f"{f.metadata.get('help', '')} [recipe: {default}]"}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in args:  # X | None: "none" gives None
        (inner,) = [a for a in args if a is not type(None)]

        def optional(value):
            return None if value.lower() == "none" else inner(value)

        optional.__name__ = f"{inner.__name__} or 'none'"  # argparse's error message names it
        parser.add_argument(flag, type=optional, metavar=f"{inner.__name__.upper()}|none", **kw)
    elif hint is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
    elif origin is list:
        parser.add_argument(flag, nargs="+", type=args[0], metavar=args[0].__name__.upper(), **kw)
    elif origin is typing.Literal:
        parser.add_argument(flag, choices=args, type=type(args[0]), **kw)
    else:
        parser.add_argument(flag, type=hint, metavar=hint.__name__.upper(), **kw)


def add_config_arguments(parser):
    """One flag per Config field (defaults are the preset's, so only given flags override)."""
    hints = typing.get_type_hints(Config)
    group = parser.add_argument_group("config (every field of insloc.config.Config)")
    for f in dataclasses.fields(Config):
        _add_field(group, f, hints[f.name])


def load_yaml(path):
    """The mapping in a --config file; a file that is missing, unreadable or not a mapping of Config fields
    gives a ValueError naming --config (main turns it into argparse's error)."""
    import yaml

    try:
        with open(path) as fh:
            values = yaml.safe_load(fh) or {}
    except OSError as e:
        raise ValueError(f"--config {path}: cannot read it: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ValueError(f"--config {path}: not valid YAML{where}: {getattr(e, 'problem', None) or e}") from e
    if not isinstance(values, dict):
        raise ValueError(f"--config {path}: expected a mapping of Config fields, got a {type(values).__name__}")
    return values


def config_from_args(args):
    cfg = PRESETS[args.preset]()
    if args.config:
        values = load_yaml(args.config)
        try:
            cfg = Config.from_dict({**cfg.to_dict(), **values})
        except ValueError as e:  # unknown keys, values of the wrong type: say which file they came from
            raise ValueError(f"--config {args.config}: {e}") from e
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if hasattr(args, f.name)}
    return dataclasses.replace(cfg, **overrides)


def default_out_dir(cfg):
    """Where a run without --out-dir writes: runs/<name> (what --resume auto continues; the name is the
    preset's unless --name or the YAML file sets it); for --resume with a run folder, its latest file or one of
    its checkpoint_<step>.pt, that run's folder (it continues there); for a fresh run, or one resumed from a
    file of another name (a copy), if runs/<name> holds checkpoints, the first of runs/<name>-2, -3, ... that
    holds none (a fresh run never writes into a folder of checkpoints; see train)."""
    from .checkpoint import is_run_file, numbered_checkpoints

    if cfg.resume not in ("", "auto"):
        if os.path.isdir(cfg.resume):
            return cfg.resume
        if is_run_file(os.path.basename(cfg.resume)):
            return os.path.dirname(cfg.resume) or "."
    base = os.path.join("runs", cfg.name)
    path, n = base, 1
    while cfg.resume != "auto" and numbered_checkpoints(path):
        n += 1
        path = f"{base}-{n}"
    return path


def build_parser():
    parser = argparse.ArgumentParser(prog="insloc", description="InsLoc self-supervised detection pretraining")
    commands = parser.add_subparsers(dest="command", required=True)
    pretrain = commands.add_parser("pretrain", help="pretrain an encoder (CPU, one GPU, or torchrun)")
    pretrain.add_argument("--preset", choices=list(PRESETS), default="insloc-r50-fpn",
                          help="starting configuration (default: insloc-r50-fpn)")
    pretrain.add_argument("--config", default=None, help="YAML file of Config fields")
    pretrain.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    add_config_arguments(pretrain)
    parser.pretrain = pretrain  # its usage line goes with errors in its flags
    commands.add_parser("export", add_help=False,
                        help="convert a pretraining checkpoint (raw, torchvision, torchvision-fpn, detectron2)")
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["export"]:
        from .export import export_main  # its own parser: insloc export CKPT --format F --out FILE

        return export_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = config_from_args(args).validate()
    except ValueError as e:  # a bad value in the flags or the YAML file: argparse's message and exit status 2
        parser.pretrain.error(str(e))
    if args.print_config:
        import yaml

        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    from .train import train

    if not cfg.out_dir:
        cfg.out_dir = default_out_dir(cfg)
    try:
        train(cfg)
    except UsageError as e:  # found at the start of the run (device, data, output folder), before any training
        parser.pretrain.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
