"""The `sparsediff` command line: results to stdout (a table, or JSON with --json), logs to stderr."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from . import __version__

logger = logging.getLogger("sparsediff")


def _cmd_show(args: argparse.Namespace) -> int:
    from .layout import TokenLayout
    from .patterns import get_pattern
    from .plan import SparsePlan
    from .render import render_pattern, render_plan

    layout = TokenLayout.parse(args.layout) if args.layout else None
    if args.pattern:
        if layout is None:
            raise ValueError("`sparsediff show --pattern` needs --layout, e.g. --layout video:4x8x8.")
        pattern = get_pattern(args.pattern)
        out = render_pattern(pattern, layout, args.out, block_size=args.block_size, scale=args.scale)
        info = {"pattern": pattern.name, "layout": str(layout), "out": str(out)}
        if args.block_size:
            info["density"] = round(pattern.estimated_density(layout, args.block_size), 4)
    elif args.plan:
        plan = SparsePlan.load(args.plan)
        out = render_plan(plan, args.out, layout=layout)
        info = {"plan": args.plan, "out": str(out), **plan.summary(layout)}
    else:
        raise ValueError("`sparsediff show` needs a plan file or --pattern NAME --layout LAYOUT.")
    _emit(info, args.json)
    return 0


def _emit(info: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(info, indent=1))
        return
    width = max(len(k) for k in info)
    for key, value in info.items():
        print(f"{key:<{width}}  {value}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparsediff",
        description="Per-head sparse attention for diffusion transformers: profile, search a plan, accelerate.",
    )
    parser.add_argument("--version", action="version", version=f"sparsediff {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs on stderr")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    show = sub.add_parser("show", help="render a plan (layer x head grid) or a pattern's mask on a layout to PNG")
    show.add_argument("plan", nargs="?", help="plan JSON file to render")
    show.add_argument("--pattern", help="a pattern name to render instead, e.g. diagonal_w1")
    show.add_argument("--layout", help="token layout, e.g. text:16+video:4x8x8 (patterns: required)")
    show.add_argument("--block-size", type=int, default=None, help="draw the block mask instead of the token mask")
    show.add_argument("--scale", type=int, default=1, help="pixels per mask cell (patterns)")
    show.add_argument("--out", required=True, help="PNG file to write")
    show.add_argument("--json", action="store_true", help="print the summary as JSON")
    show.set_defaults(func=_cmd_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
