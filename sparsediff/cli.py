"""The `sparsediff` command line: results to stdout (a table, or JSON with --json), logs to stderr."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

from .version import __version__

logger = logging.getLogger("sparsediff")


# ---- checks at the boundary: arguments, devices and output paths, before any work ----------------------------
def _whole(text: str, minimum: int, example: int) -> int:
    """A whole number of at least `minimum`, or argparse's error naming the value and the fix."""
    wanted = "one above 0" if minimum == 1 else f"{minimum} or more"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; pass {wanted}, e.g. {example}.") from None
    if value < minimum:
        below = "is not above 0" if minimum == 1 else f"is below {minimum}"
        raise argparse.ArgumentTypeError(f"{text!r} {below}; pass a whole number, {wanted}, e.g. {example}.")
    return value


def positive_int(text: str) -> int:
    """argparse type: a whole number above 0."""
    return _whole(text, 1, 8)


def non_negative_int(text: str) -> int:
    """argparse type: a whole number, 0 or above (a budget that may be none)."""
    return _whole(text, 0, 4)


def finite_float(text: str) -> float:
    """argparse type: a finite number (no nan or inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; pass a finite number, e.g. 30.") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not finite; pass a finite number, e.g. 30.")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite number above 0."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not above 0; pass a number above 0, e.g. 2.")
    return value


def allowance_range(text: str) -> tuple[float, float]:
    """argparse type: `LO,HI`, two numbers with 0 < LO < HI (the search's range of per-head error allowances)."""
    parts = text.split(",")
    try:
        lo, hi = (float(x) for x in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not two numbers LO,HI; pass e.g. 0.005,0.05.") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi):
        raise argparse.ArgumentTypeError(f"{text!r} needs 0 < LO < HI, both finite; pass e.g. 0.005,0.05.")
    return lo, hi


def scale_choices(text: str) -> tuple[float, ...]:
    """argparse type: comma-separated positive, finite numbers (the search's choices of a multiplier)."""
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not comma-separated numbers; pass e.g. 0.75,1,1.5,2.") from None
    if not all(math.isfinite(x) and x > 0 for x in values):
        raise argparse.ArgumentTypeError(f"{text!r} needs positive, finite numbers; pass e.g. 0.75,1,1.5,2.")
    return tuple(sorted(set(values)))


DTYPE_HELP = ("every component's dtype, as diffusers' from_pretrained(dtype=...) (default: the libraries' "
              "own, float32 for diffusers models); the search measures its costs in the dtype the model runs in")


def _check_device(device: str | None) -> None:
    """Refuse a --device that is unknown, or names CUDA where there is none, before anything is loaded."""
    if device is None:
        return
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {device!r} is not a device name; pass --device cpu or --device cuda.") from None
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device!r} is not supported (only cpu and cuda are); pass --device cpu or --device cuda.")
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {device!r} asks for CUDA but this machine has no CUDA device; pass --device cpu.")
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"--device {device!r} asks for CUDA device {parsed.index} but this machine has {count}; "
                             f"pass --device cuda:0, or --device cpu.")


def _check_out(out: Path, force: bool, targets: "list[Path] | None" = None, folder: bool = False) -> None:
    """Refuse an --out that cannot be written (a parent is a file; a folder where a file goes) or that would replace
    something the user already has (`targets`, default `out` itself) without --force."""
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ValueError(f"--out {str(out)!r} cannot be written because its parent {str(parent)!r} is a file; "
                         "choose an --out inside a folder.")
    if not folder and out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a folder, not a file; choose a file name for --out.")
    if folder and out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} is a file, not a folder; choose a folder for --out.")
    if not force:
        for target in targets or [out]:
            if target.exists():
                raise ValueError(f"{str(target)!r} already exists; pass --force to overwrite, or choose another --out.")


def _check_storage(storage: str | None) -> None:
    """Refuse a `sqlite:///PATH` --storage whose folder does not exist (SQLite would fail once the search starts)."""
    if not storage or not storage.startswith("sqlite:///"):
        return
    database = storage[len("sqlite:///"):].split("?", 1)[0]
    if database in ("", ":memory:"):
        return
    folder = Path(database).parent
    if not folder.is_dir():
        raise ValueError(f"--storage {storage!r} puts the study in {str(folder)!r}, which is not a folder; create that "
                         "folder first, or choose another --storage.")


def _cmd_show(args: argparse.Namespace) -> int:
    from .layout import TokenLayout
    from .patterns import get_pattern
    from .plan import SparsePlan
    from .render import MAX_DENSITY_BLOCKS, render_pattern, render_plan

    layout = TokenLayout.parse(args.layout) if args.layout else None
    profile_dir = bool(args.plan) and Path(args.plan).is_dir()
    # a profile's two PNGs are checked by render_profile, once the chosen layers and steps are known to exist
    _check_out(Path(args.out), args.force or profile_dir)
    if args.pattern:
        if layout is None:
            raise ValueError("`sparsediff show --pattern` needs --layout, e.g. --layout video:4x8x8.")
        pattern = get_pattern(args.pattern)
        out = render_pattern(pattern, layout, args.out, block_size=args.block_size, scale=args.scale)
        info = {"pattern": pattern.name, "layout": str(layout), "out": str(out)}
        if args.block_size and layout.num_blocks(args.block_size) > MAX_DENSITY_BLOCKS:
            logger.warning("density not computed: %d blocks per side is over %d; pass a larger --block-size for it.",
                           layout.num_blocks(args.block_size), MAX_DENSITY_BLOCKS)
        elif args.block_size:
            info["density"] = round(pattern.estimated_density(layout, args.block_size), 4)
    elif profile_dir:
        from .render import render_profile
        from .search.profile import AttentionProfile

        prof = AttentionProfile.load(args.plan)
        maps, errors, preferred = render_profile(prof, args.out, layers=_ints(args.layers), steps=_ints(args.steps),
                                                 force=args.force)
        info = {"profile": args.plan, "out": str(maps), "errors_out": str(errors), "preferred_out": str(preferred),
                "model": prof.model.model_class,
                "layout": str(prof.layout), "mean_errors": prof.mean_errors(), "concentration": _concentration(prof)}
    elif args.plan:
        plan = SparsePlan.load(args.plan)
        out = render_plan(plan, args.out, layout=layout)
        info = {"plan": args.plan, "out": str(out), **plan.summary(layout)}
    else:
        raise ValueError("`sparsediff show` needs a plan file or --pattern NAME --layout LAYOUT.")
    _emit(info, args.json)
    return 0


def _ints(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{text!r} is not a comma-separated list of integers, e.g. 0,5,9.") from None


def _read_prompts(path: str, flag: str) -> list[str]:
    """The non-empty lines of a UTF-8 prompt file given as `flag`."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{flag} {path!r} is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}); "
                         "pass a text file with one prompt per line.") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _calibration_calls(args: argparse.Namespace) -> list[dict]:
    """Pipeline arguments of the calibration runs: one per prompt, seeded by its position."""
    prompts = ["A red panda climbs a mossy tree in the rain, cinematic lighting."]
    if args.prompts:
        prompts = _read_prompts(args.prompts, "--prompts")
        if not prompts:
            raise ValueError(f"--prompts {args.prompts!r} holds no prompt; write one prompt per line.")
    sizes = {"height": args.height, "width": args.width, "num_frames": args.frames,  # video pipelines
             "gen_length": getattr(args, "gen_length", None), "block_length": getattr(args, "block_length", None)}  # text
    return [dict(prompt=p, num_inference_steps=args.steps, seed=i, **{k: v for k, v in sizes.items() if v is not None})
            for i, p in enumerate(prompts)]


def _validation_calls(path: str, calibration: list[dict]) -> list[dict]:
    """Held-out calls of the prompts in the file `path` (`held_out_calls`)."""
    prompts = _read_prompts(path, "--validate-prompts") if Path(path).is_file() else None
    if not prompts:
        raise ValueError(f"--validate-prompts {path!r} is not a file of prompts; write one held-out prompt per line.")
    if not calibration:
        raise ValueError("--validate-prompts needs calibration calls to copy settings from: pass --prompts/--steps, or a profile from `sparsediff profile`.")
    return held_out_calls(prompts, calibration)


def held_out_calls(prompts: list[str], calibration: list[dict]) -> list[dict]:
    """The held-out calls of `prompts`: the first calibration call's settings, seeds 1000, 1001, ... (not the calibration's)."""
    template = {k: v for k, v in calibration[0].items() if k not in ("prompt", "seed")}
    return [dict(template, prompt=p, seed=1000 + i) for i, p in enumerate(prompts)]


def _cmd_search(args: argparse.Namespace) -> int:
    import subprocess

    from .api import load_pipeline, search_plan
    from .search.profile import AttentionProfile

    out = Path(args.out)
    _check_device(args.device)
    _check_out(out, force=True)  # where it can be written; what it would replace is checked below
    _check_storage(args.storage)
    for flag, path in (("--prompts", args.prompts), ("--validate-prompts", args.validate_prompts)):
        if path and Path(path).is_file():
            _read_prompts(path, flag)  # an unreadable prompt file is refused before the model loads
    if not args.force and not args.worker and (out.exists() or out.with_name("search_report.png").exists()):
        raise ValueError(f"{str(out)!r} or its search_report.png already exists; pass --force to overwrite, or choose another --out.")
    # the other workers run the same command with the same --out (so the same default storage) and only run trials
    workers = [subprocess.Popen([sys.executable, "-m", "sparsediff.cli", *args.argv, "--workers", "1", "--worker"])
               for _ in range(args.workers - 1)]
    try:
        profile = AttentionProfile.load(args.profile)
        pipe = load_pipeline(args.model, args.device, dtype=args.dtype)
        pipe.set_progress_bar_config(disable=True)
        calls = None
        if args.prompts or args.steps:
            args.steps = args.steps or profile.num_steps or 10
            calls = _calibration_calls(args)
        block_sizes = tuple(_ints(args.block_sizes)) if args.block_sizes else None
        validation_calls = _validation_calls(args.validate_prompts, calls or profile.meta.get("calls") or []) if args.validate_prompts else None
        result = search_plan(pipe, profile, calls, out=out, min_psnr=args.min_psnr, target_speedup=args.target_speedup,
                             trials=args.trials, timeout=args.timeout, storage=args.storage, backend=args.backend,
                             block_sizes=block_sizes, force=args.force, progress=not args.json and not args.worker,
                             log=lambda line: logger.info(line), return_summary=True, validation_calls=validation_calls,
                             choose=not args.worker, ranges=args.ranges, allowance=args.allowance, refine=args.refine,
                             prune_ahead=args.prune_ahead, range_scales=args.range_scales,
                             validation_min_psnr=args.validate_min_psnr)
    except BaseException:
        for worker in workers:
            worker.terminate()
        raise
    for worker in workers:
        if worker.wait() != 0:  # its running trial, if any, was retried by the others
            logger.warning(f"search worker {worker.pid} exited with status {worker.returncode}")
    if args.worker:
        return 0
    plan, summary = result
    if args.json:
        print(json.dumps(summary, indent=1, default=str))
        return 0
    c = summary["chosen"]
    print(f"trials {summary['trials']} (pruned {summary['pruned']}), Pareto front {len(summary['pareto_front'])}, study {summary['study']}")
    print(f"{'trial':>5} {'pred. attn x':>12} {'PSNR dB':>8} {'dense steps':>11} {'allowance':>9}")
    for o in summary["pareto_front"]:
        mark = "  <- chosen" if o["number"] == c["number"] else ""
        print(f"{o['number']:>5} {o['predicted_speedup']:>12.2f} {o['psnr']:>8.1f} {o['params'].get('dense_steps', 0):>11} "
              f"{o['params'].get('allowance', 0):>9.3f}{mark}")
    print(f"chosen plan {summary['plan']}: predicted attention speedup {c['predicted_speedup']:.2f}x, measured run "
          f"speedup {c['measured_speedup']:.2f}x, PSNR {c['psnr']:.1f} dB; report {summary['report']}")
    if "scales" in c:  # a refinement trial's own multipliers of the allowance
        print("refined multipliers: per step range " + ", ".join(f"{x:.3g}" for x in c["scales"]["range"]) +
              "; per layer " + ", ".join(f"{x:.3g}" for x in c["scales"]["layer"]))
    if "validation" in summary:
        v = summary["validation"]
        print(f"held out: {v['psnr']:.1f} dB on {v['calls']} held-out prompt(s) (trials validated, fastest first: {v['tried']})")
    return 0


def _cmd_generate_video(args: argparse.Namespace) -> int:
    from .api import load_pipeline, resolve_plan
    from .generate import generate, video_target, write_video

    _check_device(args.device)
    _check_out(Path(args.out), args.force, targets=[video_target(args.out)])
    plan = args.plan
    if plan not in ("auto", "dense"):  # a bad plan file is refused before the model loads
        from .plan import SparsePlan

        plan = SparsePlan.load(plan)
    rank = 0
    if args.ulysses > 1:
        import os
        import subprocess

        from .pipelines.parallel import check_gpus, enable_ulysses, torchrun_command

        check_gpus(args.ulysses)
        if "LOCAL_RANK" not in os.environ:  # not started by torchrun yet: start one process per GPU, each this command
            return subprocess.call(torchrun_command(args.argv, args.ulysses))
        args.device = f"cuda:{os.environ['LOCAL_RANK']}"
    pipe = load_pipeline(args.model, args.device, dtype=args.dtype)
    if args.ulysses > 1:
        rank = enable_ulysses(pipe, args.ulysses)
    pipe.set_progress_bar_config(disable=args.json or rank != 0)
    plan = resolve_plan(pipe, plan)
    sizes = {k: v for k, v in {"height": args.height, "width": args.width, "num_frames": args.frames}.items() if v}
    result = generate(pipe, [args.prompt], plan, backend=args.backend, seed=args.seed, num_inference_steps=args.steps, **sizes)
    if rank != 0:  # every rank holds the whole video; rank 0 writes it
        return 0
    out = write_video(result.frames[0], args.out, fps=args.fps, force=args.force)
    frames = result.frames[0]
    info = {"out": str(out), "prompt": args.prompt, "frames": int(frames.shape[0]), "height": int(frames.shape[1]),
            "width": int(frames.shape[2]), "steps": args.steps, "seconds": round(result.seconds, 3),
            "plan": "dense" if plan is None else ("shipped" if args.plan == "auto" else str(args.plan)),
            "dtype": str(pipe.dtype).removeprefix("torch."), **result.stats}
    _emit(info, args.json)
    return 0


def _cmd_generate_reconstruct(args: argparse.Namespace) -> int:
    from .api import load_pipeline
    from .pipelines.reconstruct import generate as rec

    _check_device(args.device)
    _check_out(Path(args.out), args.force, targets=[Path(args.out) / "sequence.mp4"], folder=True)
    plan = args.plan
    if plan not in ("auto", "dense"):
        from .plan import SparsePlan

        plan = SparsePlan.load(plan)
    sample = rec.parse_sample(args.sample) if args.sample else None
    points = rec.read_points(args.input) if args.input else None
    pipe = load_pipeline(args.model, args.device, kind="reconstruct")
    pipe.set_progress_bar_config(disable=args.json)
    input_type = pipe.deformation_denoiser.config.input_type
    if sample is not None:
        points = rec.sample_points(*sample, input_type, n_points=args.points, seed=args.seed)
    result = rec.reconstruct(pipe, points, plan, backend=args.backend, seed=args.seed, steps=args.steps,
                             mesh_resolution=args.resolution)
    files = rec.write_outputs(result, points, Path(args.out), args.format)
    info = {"out": args.out, "input": args.input or args.sample, "input_type": input_type, "frames": int(result.vertices.shape[0]),
            "vertices": int(result.vertices.shape[1]), "faces": int(result.faces.shape[0]), "steps": args.steps,
            "seconds": round(result.seconds, 3), "timings": {k: round(v, 3) for k, v in result.timings.items()},
            "plan": args.plan if args.plan in ("auto", "dense") else str(args.plan), **result.stats, **files}
    if sample is not None:  # the ground truth is known: the OFlow / CaDeX protocol
        from .pipelines.reconstruct import data
        from .pipelines.reconstruct.geometry import sequence_metrics

        metrics = sequence_metrics(result.vertices, result.faces, data.sequence(*sample), n_points=args.metric_points)
        info.update({k: metrics[k] for k in ("iou", "chamfer_l1", "correspondence_l2")})
    _emit(info, args.json)
    return 0


def _cmd_generate_text(args: argparse.Namespace) -> int:
    from .api import load_pipeline
    from .generate import generate_text

    _check_device(args.device)
    prompts = [args.prompt] if args.prompt is not None else _read_prompts(args.prompts, "--prompts")
    if not prompts:
        raise ValueError(f"--prompts {args.prompts!r} holds no prompt; write one prompt per line.")
    plan = args.plan
    if plan not in ("auto", "dense"):  # a bad plan file is refused before the model loads
        from .plan import SparsePlan

        plan = SparsePlan.load(plan)
    pipe = load_pipeline(args.model, args.device, kind="text", dtype=args.dtype)
    pipe.set_progress_bar_config(disable=True)
    if args.model == "embedded":  # its tasks' answer slots: one block of 8, one token per step
        from .pipelines.embedded_text.evaluate import call_arguments

        defaults = call_arguments()
    else:
        defaults = {"num_inference_steps": 32, "gen_length": 128}
    call = {**defaults, "num_inference_steps": args.steps or defaults["num_inference_steps"],
            "gen_length": args.gen_length or defaults["gen_length"]}
    if args.block_length or "block_length" in defaults:
        call["block_length"] = args.block_length or defaults["block_length"]
    result = generate_text(pipe, prompts, plan, backend=args.backend, seed=args.seed, **call)
    info = {"prompts": prompts, "texts": result.texts, "seconds": round(result.seconds, 3),
            "plan": args.plan if args.plan in ("auto", "dense") else str(args.plan), **result.stats}
    if args.json:
        print(json.dumps(info, indent=1, default=str))
    else:
        for prompt, text in zip(prompts, result.texts):
            print(f"{prompt}\t{text}")
        print(f"{result.seconds:.2f} s; {json.dumps(result.stats, default=str)}", file=sys.stderr)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .generate import run_demo

    result = run_demo(args.out, num_prompts=args.prompts, steps=args.steps, seed=args.seed, backend=args.backend,
                      height=args.height, width=args.width, num_frames=args.frames, dtype=args.dtype)
    text, text_skipped = None, None
    if args.text_tasks:
        from .pipelines.embedded_text.evaluate import run_text_demo
        from .pipelines.embedded_text.model import embedded_text_path

        if (embedded_text_path() / "plan.json").is_file():
            text = run_text_demo(args.text_tasks, args.text_length, backend=args.backend, seed=args.seed, dtype=args.dtype)
        else:  # said, not hidden: the section needs the trained DLM and its plan (issue 13)
            text_skipped = "no embedded diffusion LM with a plan ships in this version (train it with samples/train_embedded_text.py)"
            print(f"sparsediff demo: text section skipped: {text_skipped}.", file=sys.stderr)
    recon = None
    if args.reconstruct:
        from .pipelines.reconstruct.generate import run_reconstruct_demo

        recon = run_reconstruct_demo(Path(args.out), args.reconstruct, seed=args.seed)
    if args.json:
        text_info = text.to_dict() if text else ({"skipped": text_skipped} if text_skipped else None)
        print(json.dumps({**result.to_dict(), **({"text": text_info} if text_info else {}),
                          **({"reconstruct": recon.to_dict()} if recon else {})}, indent=1))
    else:
        print(f"embedded video model, {len(result.prompts)} prompts, {result.steps} steps, {result.dtype}, dense vs its "
              "shipped plan")
        print(result.table())
        for name, path in result.files.items():
            print(f"{name}: {path}")
        if text is not None:
            print(f"\nembedded diffusion LM, {text.tasks} held-out tasks of {text.length} tokens, {text.dtype}, dense vs its "
                  "shipped plan")
            print(text.table())
        if recon is not None:
            print(f"\nembedded 4D reconstructor, held-out sequence {recon.sample} (sparse input; one sequence: the "
                  "split's means are in BENCHMARKS.md §8)")
            print(recon.table())
            for name, path in recon.files.items():
                print(f"{name}: {path}")
    return 0


def _cmd_profile(args: argparse.Namespace) -> int:
    import torch

    from .api import load_pipeline, profile

    _check_device(args.device)
    _check_out(Path(args.out), args.force, folder=True)
    calls = _calibration_calls(args)
    pipe = load_pipeline(args.model, args.device, dtype=args.dtype)
    pipe.set_progress_bar_config(disable=True)  # the profile's own bar counts the work
    from .pipelines.adapter import adapter_for

    output_type = adapter_for(pipe).profile_output_type  # skip decoding what the profile does not look at
    inputs = [dict(c, output_type=output_type, generator=torch.Generator().manual_seed(c.pop("seed"))) for c in map(dict, calls)]
    candidates = args.candidates.split(",") if args.candidates else None
    prof = profile(pipe, inputs, out=args.out, candidates=candidates, block_size=args.block_size,
                   steps=_ints(args.record_steps), layers=_ints(args.layers), progress=not args.json,
                   meta={"calls": calls})
    info = {"out": args.out, "model": prof.model.model_class, "layout": str(prof.layout), "prompts": len(calls),
            "steps": len(prof.steps), "layers": len(prof.layers), "heads": prof.num_heads,
            "mass_shape": list(prof.mass.shape), "errors_shape": list(prof.errors.shape),
            "mean_errors": prof.mean_errors(), "concentration": _concentration(prof)}
    _emit(info, args.json)
    return 0


def _concentration(prof) -> dict:
    """The profile's `concentration_summary`, with a warning when most heads spread their attention evenly."""
    summary = prof.concentration_summary()
    if summary["heads"] and 2 * summary["diffuse_heads"] > summary["heads"]:
        logger.warning(
            "%d of %d heads spread their attention almost evenly (their %d%% most attended key blocks hold under %.0f%% "
            "of it, against %.0f%% if even): sparse patterns on them keep little attention, so their error depends on "
            "the content; validate plans on held-out prompts (`sparsediff search --validate-prompts`).",
            summary["diffuse_heads"], summary["heads"], round(100 * summary["share"]), 100 * summary["diffuse_below"],
            100 * summary["even"])
    return summary


def _cmd_bench(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from . import bench
    from .layout import TokenLayout
    from .timing import device_name

    if args.layout and args.seq_len:
        raise ValueError("Give --layout or --seq-len, not both.")
    layout = TokenLayout.parse(args.layout) if args.layout else bench.video_layout_for(args.seq_len or 8192)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = bench.DTYPES[args.dtype]
    backends = bench.resolve_backends(args.backend, device)
    if args.sweep:
        cases = bench.sweep_cases(layout, args.heads, args.block_size)
    elif args.pattern:
        patterns = bench.parse_patterns(args.pattern, args.heads)
        cases = [(args.pattern if len(args.pattern) < 27 else "mixed", patterns)]
    elif args.density is not None:
        cases = [(k, [bench.pattern_for_density(k, args.density, layout, args.block_size)] * args.heads) for k in args.kinds.split(",")]
        cases = [(ps[0].name, ps) for _, ps in cases]
    else:
        raise ValueError("`sparsediff bench attention` needs --pattern NAME[,NAME...], --density X or --sweep.")
    logger.info("layout %s (%d tokens), %d heads x %d, %s, block %d, backends %s", layout, layout.num_tokens,
                args.heads, args.head_dim, args.dtype, args.block_size, ",".join(backends))
    if torch.device(device).type == "cpu":
        from .kernels import cpu_kernel

        logger.info("compiled CPU kernel: %s", cpu_kernel.status())
    results = []
    for name, patterns in tqdm(cases, desc="bench attention", file=sys.stderr, disable=args.json):
        results.append(bench.run_case(name, patterns, layout, backends, args.batch, args.head_dim, dtype,
                                      args.block_size, args.repeats, device))
    if args.json:
        meta = {"layout": str(layout), "heads": args.heads, "head_dim": args.head_dim, "dtype": args.dtype,
                "block_size": args.block_size, "batch": args.batch, "device": device_name(device),
                "torch": torch.__version__}
        if torch.device(device).type == "cpu":
            meta["cpu_kernel"] = cpu_kernel.status()
        print(json.dumps({"config": meta, "results": [r.to_dict() for r in results]}, indent=1))
    else:
        print(bench.format_table(results, backends))
    return 0


def _cmd_bench_cost(args: argparse.Namespace) -> int:
    import torch

    from . import bench
    from .layout import TokenLayout

    layout = TokenLayout.parse(args.layout) if args.layout else bench.video_layout_for(args.seq_len or 8192)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    report = bench.validate_cost_model(layout, args.heads, args.head_dim, layers=args.layers, block_size=args.block_size,
                                       backend=args.backend, dtype=bench.DTYPES[args.dtype], device=device,
                                       repeats=args.repeats)
    if args.json:
        print(json.dumps(report, indent=1))
        return 0
    print(f"cost model on {layout}, {args.heads} heads x {args.head_dim}, {report['key']['backend']}, {report['key']['device']}")
    print(f"{'layer patterns (per head)':<60} {'predicted ms':>13} {'measured ms':>12} {'error':>7}")
    for r in report["layers"]:
        names = ",".join(r["patterns"])
        print(f"{names[:60]:<60} {r['predicted_ms']:>13.1f} {r['measured_ms']:>12.1f} {r['error'] * 100:>+6.1f}%")
    print(f"mean |error| {report['mean_abs_error'] * 100:.1f}%, max |error| {report['max_abs_error'] * 100:.1f}% (target: within 15%)")
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
    parser.add_argument("--debug", action="store_true", help="on an error, show the Python traceback too")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    show = sub.add_parser("show", help="render a plan (layer x head grid) or a pattern's mask on a layout to PNG")
    show.add_argument("plan", nargs="?", help="plan JSON file, or profile directory, to render")
    show.add_argument("--pattern", help="a pattern name to render instead, e.g. diagonal_w1")
    show.add_argument("--layout", help="token layout, e.g. text:16+video:4x8x8 (patterns: required)")
    show.add_argument("--block-size", type=positive_int, default=None, help="draw the block mask instead of the token mask")
    show.add_argument("--scale", type=positive_int, default=1, help="pixels per mask cell (patterns)")
    show.add_argument("--out", required=True, help="PNG file to write (profiles: and <stem>_errors.png, <stem>_preferred.png beside it)")
    show.add_argument("--force", action="store_true", help="overwrite existing PNGs")
    show.add_argument("--layers", help="profiles: layers to draw, comma-separated (default: first, middle, last)")
    show.add_argument("--steps", help="profiles: steps to draw, comma-separated (default: first and last)")
    show.add_argument("--json", action="store_true", help="print the summary as JSON")
    show.set_defaults(func=_cmd_show)

    prof = sub.add_parser("profile", help="record per-head attention mass and each candidate pattern's error")
    prof.add_argument("--model", required=True, help="a saved diffusers video or text (LLaDA2) pipeline directory")
    prof.add_argument("--prompts", help="text file, one calibration prompt per line (default: one built-in prompt)")
    prof.add_argument("--steps", type=positive_int, default=10, help="denoising steps per prompt")
    prof.add_argument("--height", type=positive_int, help="video height in pixels (default: the pipeline's)")
    prof.add_argument("--width", type=positive_int, help="video width in pixels (default: the pipeline's)")
    prof.add_argument("--frames", type=positive_int, help="video frames (default: the pipeline's)")
    prof.add_argument("--gen-length", type=positive_int, help="text pipelines: tokens to generate (default: the pipeline's)")
    prof.add_argument("--block-length", type=positive_int, help="text pipelines: tokens per block (default: the scheduler's)")
    prof.add_argument("--out", required=True, help="directory to write profile.json and tensors.safetensors to")
    prof.add_argument("--force", action="store_true", help="write into an existing --out directory, replacing its profile")
    prof.add_argument("--candidates", help="comma-separated pattern names (default: the standard list)")
    prof.add_argument("--block-size", type=positive_int, default=64, help="block size of the candidates' block masks")
    prof.add_argument("--record-steps", help="step indices to record, comma-separated (default: all)")
    prof.add_argument("--layers", help="layer indices to record, comma-separated (default: all)")
    prof.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    prof.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help=DTYPE_HELP)
    prof.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    prof.set_defaults(func=_cmd_profile)

    srch = sub.add_parser("search", help="search the fastest plan within a quality floor (Optuna, measured costs)")
    srch.add_argument("--model", required=True, help="the saved diffusers pipeline the profile was recorded on")
    srch.add_argument("--profile", required=True, help="profile directory from `sparsediff profile`")
    srch.add_argument("--out", required=True, help="plan JSON to write (search_report.png goes beside it)")
    srch.add_argument("--min-psnr", type=finite_float, default=30.0, help="quality floor against the dense output: PSNR in dB (video), token agreement in [0, 1] (text)")
    srch.add_argument("--target-speedup", type=positive_float, help="instead: best quality reaching this predicted speedup")
    srch.add_argument("--trials", type=positive_int, default=20, help="trials in the study (shared by all workers)")
    srch.add_argument("--timeout", type=positive_float, help="stop starting trials after this many seconds")
    srch.add_argument("--storage", help="SQLAlchemy URL of the study (default: an SQLite file beside --out); "
                      "postgresql://user@host/db for workers on several machines")
    srch.add_argument("--workers", type=positive_int, default=1, help="worker processes on this machine sharing the "
                      "study and its --trials budget (more machines: start `sparsediff search` on each, same --storage)")
    srch.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # runs trials only; started by --workers
    srch.add_argument("--backend", help="kernel backend to cost and run (default: automatic)")
    srch.add_argument("--block-sizes", help="block sizes to try, comma-separated (default: the profile's)")
    srch.add_argument("--ranges", type=positive_int, default=2, help="step ranges of the plan, each with its own "
                      "per-head patterns (default 2; at most the run's steps)")
    srch.add_argument("--allowance", type=allowance_range, metavar="LO,HI",
                      help="range of the per-head error allowance (relative L2) the trials draw from, log scale "
                      "(default 0.01,1.0); narrow it where the profile's errors show which allowances can hold the floor")
    srch.add_argument("--refine", type=non_negative_int, default=4, metavar="N",
                      help="the budget's last N trials bisect the allowance of the fastest plan meeting the floor towards "
                      "the loosest known to fail it, then one step range's or layer's multiplier at a time (default 4; 0: "
                      "every trial from the sampler)")
    srch.add_argument("--range-scales", type=scale_choices, metavar="X,Y,...",
                      help="choices of a per-step-range multiplier of the allowance, one drawn per range (default: none, "
                      "every range 1); e.g. 0.75,1,1.5,2 lets the search spend error where along the run it costs least")
    srch.add_argument("--prune-ahead", type=non_negative_int, default=3, metavar="N",
                      help="once N trials have completed, prune a trial whose running PSNR less 90%% of the smallest "
                      "loss any of them had from that step to the end, plus 1 dB, is below the floor (default 3; 0: only at the floor)")
    srch.add_argument("--prompts", help="calibration prompts, one per line (default: the profile's)")
    srch.add_argument("--steps", type=positive_int, help="denoising steps of the calibration runs (default: the profile's)")
    srch.add_argument("--validate-prompts", help="held-out prompts, one per line: the chosen plan must hold the floor on them too")
    srch.add_argument("--validate-min-psnr", type=finite_float, default=None,
                      help="the floor on the --validate-prompts (default --min-psnr): --min-psnr steers the search on the "
                      "calibration prompts, this one decides on the held-out ones")
    srch.add_argument("--height", type=positive_int)
    srch.add_argument("--width", type=positive_int)
    srch.add_argument("--frames", type=positive_int)
    srch.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    srch.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help=DTYPE_HELP)
    srch.add_argument("--force", action="store_true", help="overwrite an existing plan and report")
    srch.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    srch.set_defaults(func=_cmd_search)

    gen = sub.add_parser("generate", help="generate with a pipeline, dense or under a plan")
    gen_sub = gen.add_subparsers(dest="generate_what", metavar="WHAT", required=True)
    vid = gen_sub.add_parser("video", help="one clip to MP4 (GIF when ffmpeg is missing), with time and stats")
    vid.add_argument("--model", default="embedded", help="`embedded` (default) or a saved diffusers pipeline directory")
    vid.add_argument("--prompt", required=True)
    vid.add_argument("--plan", default="auto", help="`auto` (default: the model's shipped plan if it has one, else dense), `dense`, or a plan JSON")
    vid.add_argument("--steps", type=positive_int, default=20)
    vid.add_argument("--seed", type=int, default=0)
    vid.add_argument("--height", type=positive_int)
    vid.add_argument("--width", type=positive_int)
    vid.add_argument("--frames", type=positive_int)
    vid.add_argument("--fps", type=positive_int, default=8)
    vid.add_argument("--backend", help="kernel backend (default: automatic)")
    vid.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    vid.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help=DTYPE_HELP)
    vid.add_argument("--ulysses", type=positive_int, default=1, help="GPUs to split attention heads over with diffusers' "
                     "Ulysses context parallelism (starts itself through torchrun, one process per GPU)")
    vid.add_argument("--out", required=True, help="video file to write (.mp4; .gif where ffmpeg is missing)")
    vid.add_argument("--force", action="store_true", help="overwrite an existing video")
    vid.add_argument("--json", action="store_true")
    vid.set_defaults(func=_cmd_generate_video)

    txt = gen_sub.add_parser("text", help="text from a diffusion language model pipeline (diffusers' LLaDA2Pipeline)")
    txt.add_argument("--model", required=True, help="`embedded` (sparsediff's own diffusion LM) or a saved text diffusion pipeline directory")
    src = txt.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="one prompt")
    src.add_argument("--prompts", help="a text file, one prompt per line")
    txt.add_argument("--plan", default="auto", help="`auto` (default: the model's shipped plan if it has one, else dense), `dense`, or a plan JSON")
    txt.add_argument("--steps", type=positive_int, help="denoising steps per block (default: 8 for the embedded model, else 32)")
    txt.add_argument("--gen-length", type=positive_int, help="tokens to generate (default: 8 for the embedded model, else 128)")
    txt.add_argument("--block-length", type=positive_int, help="tokens per block (default: the scheduler's)")
    txt.add_argument("--seed", type=int, default=0)
    txt.add_argument("--backend", help="kernel backend (default: automatic)")
    txt.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    txt.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help=DTYPE_HELP)
    txt.add_argument("--json", action="store_true")
    txt.set_defaults(func=_cmd_generate_text)

    rec = gen_sub.add_parser("reconstruct", help="a mesh sequence from a point-cloud sequence (sparsediff's 4D reconstructor)")
    rec.add_argument("--model", default="embedded", help="`embedded` (default) or a saved Motion2VecSetsPipeline directory")
    src = rec.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="a .npy (T, n, 3) array or a .npz with a 'points' array, frame 0 first")
    src.add_argument("--sample", help="SPLIT:INDEX of the synthetic data (ground truth known: IoU, Chamfer, correspondence)")
    rec.add_argument("--out", required=True, help="folder for frame_XX meshes and sequence.mp4")
    rec.add_argument("--plan", default="auto", help="`auto` (the shipped plan if any, else dense), `dense`, or a plan JSON")
    rec.add_argument("--steps", type=positive_int, default=18, help="Heun steps per solve (18 as Motion2VecSets)")
    rec.add_argument("--resolution", type=positive_int, default=64, help="marching-cubes grid of the frame-0 mesh")
    rec.add_argument("--format", choices=["ply", "obj"], default="ply")
    rec.add_argument("--points", type=positive_int, default=128, help="input points per frame for --sample")
    rec.add_argument("--metric-points", type=positive_int, default=100_000, help="points for IoU and Chamfer (--sample)")
    rec.add_argument("--seed", type=int, default=0)
    rec.add_argument("--backend", help="kernel backend (default: automatic)")
    rec.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    rec.add_argument("--force", action="store_true", help="overwrite existing outputs in --out")
    rec.add_argument("--json", action="store_true")
    rec.set_defaults(func=_cmd_generate_reconstruct)

    demo = sub.add_parser("demo", help="the embedded model dense vs its shipped plan, side by side, with one table")
    demo.add_argument("--out", default="demo", help="folder for the side-by-side MP4 and the frame strip")
    demo.add_argument("--prompts", type=int, default=3, help="prompts to generate (3 keep the demo well under 5 minutes on a 2-core CPU)")
    demo.add_argument("--steps", type=int, default=12, help="denoising steps (12 keeps the demo under 5 minutes on a 2-core CPU)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--height", type=int, default=64, help="pixels (64 x 64 x 8 frames = 8192 tokens)")
    demo.add_argument("--width", type=int, default=64)
    demo.add_argument("--frames", type=int, default=8)
    demo.add_argument("--text-tasks", type=int, default=3, help="held-out tasks for the text section (0 leaves it out)")
    demo.add_argument("--text-length", type=int, default=4096, help="context tokens of each text task")
    demo.add_argument("--reconstruct", default="unseen_motion:1", help="SPLIT:INDEX for the 4D reconstruction section ('' leaves it out)")
    demo.add_argument("--backend", help="kernel backend (default: automatic)")
    demo.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="the video and text models' dtype, "
                      "both runs (default float32; their plans were searched in float32)")
    demo.add_argument("--json", action="store_true", help="print the figures as JSON on stdout")
    demo.set_defaults(func=_cmd_demo)

    bench = sub.add_parser("bench", help="benchmarks: sparse vs dense SDPA vs FlexAttention, in one run")
    bench_sub = bench.add_subparsers(dest="bench_what", metavar="WHAT", required=True)
    att = bench_sub.add_parser("attention", help="one attention layer: correctness check, then times and efficiency")
    att.add_argument("--layout", help="token layout, e.g. video:8x32x32 or text:226+video:13x30x45")
    att.add_argument("--seq-len", type=int, help="a video layout of N tokens (8 frames), default 8192")
    att.add_argument("--heads", type=int, default=8)
    att.add_argument("--head-dim", type=int, default=64)
    att.add_argument("--batch", type=int, default=1)
    att.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    att.add_argument("--block-size", type=int, default=64)
    att.add_argument("--pattern", help="a pattern for every head (diagonal_w1) or one per head, comma-separated")
    att.add_argument("--density", type=float, help="instead of --pattern: each of --kinds at this density")
    att.add_argument("--kinds", default="diagonal,multi_diagonal,vertical_stripe", help="kinds for --density")
    att.add_argument("--sweep", action="store_true", help="the standard sweep (band/stripe at 0.1/0.25/0.5, topk, mixed)")
    att.add_argument("--backend", help="comma-separated backends (default: all that run here)")
    att.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    att.add_argument("--repeats", type=int, default=5, help="timed rounds per case (median reported)")
    att.add_argument("--json", action="store_true", help="print the results as JSON on stdout")
    att.set_defaults(func=_cmd_bench)
    cost = bench_sub.add_parser("cost", help="measure the cost model and check it on held-out mixed layers")
    cost.add_argument("--layout", help="token layout (default: a video layout of --seq-len tokens)")
    cost.add_argument("--seq-len", type=int, help="a video layout of N tokens (8 frames), default 8192")
    cost.add_argument("--heads", type=int, default=8)
    cost.add_argument("--head-dim", type=int, default=64)
    cost.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    cost.add_argument("--block-size", type=int, default=64)
    cost.add_argument("--backend", help="backend to model (default: automatic)")
    cost.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    cost.add_argument("--layers", type=int, default=8, help="held-out random mixed layers to check")
    cost.add_argument("--repeats", type=int, default=3)
    cost.add_argument("--json", action="store_true")
    cost.set_defaults(func=_cmd_bench_cost)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for `search --workers` to start its workers
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except (ValueError, OSError) as e:
        if args.debug:
            raise
        if isinstance(e, OSError) and e.filename is not None:  # a path of the user's could not be read or written
            reason = (e.strerror or type(e).__name__).lower()
            e = f"{str(e.filename)!r} could not be used ({reason}); check that path, or choose another."
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
