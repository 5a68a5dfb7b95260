"""Command line of the study: ``python benchmarks/validation.py [--fast] [--out DIR] ...``."""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace
from pathlib import Path

from . import __doc__ as STUDY_DOC
from .config import DEFAULT, FAST, FRESH, StudyConfig
from .runs import RunRecord, Timing, load_cache, machine, quiet, run_all, save_cache

ROOT = Path(__file__).resolve().parents[2]
PUBLISHED = ROOT / "docs"  # the published report: only the full study writes here by default
FAST_OUT = ROOT / "memwatch_out" / "validation-fast"  # git-ignored


def parser() -> argparse.ArgumentParser:
    """The study's arguments."""
    ap = argparse.ArgumentParser(
        description=STUDY_DOC.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--fast", action="store_true", help="CI smoke size (three small data sets, 2 seeds; < 1 min)")
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="where validation.md and img/ go (default: docs/; with --fast memwatch_out/validation-fast/, "
        "so a smoke run never overwrites the published report)",
    )
    ap.add_argument(
        "--workers",
        type=int,
        default=None,
        help="training processes in parallel, one thread each (default: 1 with --fast, else 2 "
        "or the number of CPUs if smaller)",
    )
    ap.add_argument("--cache", type=Path, default=None, help="also save the recorded checks here (torch.save)")
    ap.add_argument(
        "--fresh",
        action="store_true",
        help="train the fresh-seed grid (config.FRESH) into --cache, for --fresh-cache; no report",
    )
    ap.add_argument("--train-only", action="store_true", help="train and save to --cache; write no report")
    ap.add_argument(
        "--selection-out",
        type=Path,
        default=None,
        help="with --from-cache: write only what the selection seeds choose to this markdown file (no report)",
    )
    ap.add_argument(
        "--resume", action="store_true", help="keep the runs already in --cache and train only the missing ones"
    )
    ap.add_argument(
        "--datasets", nargs="+", default=None, help="train only these data sets of the grid (e.g. to train some later)"
    )
    ap.add_argument(
        "--from-cache",
        type=Path,
        nargs="+",
        default=None,
        help="skip training; analyse saved checks (one or more caches)",
    )
    ap.add_argument(
        "--fresh-cache",
        type=Path,
        nargs="+",
        default=None,
        help="saved checks of runs on further seeds (e.g. --seeds 3 4 --cache ...): evaluated, never used to choose",
    )
    ap.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help="train these seeds instead; without the selection seed only with --cache, for --fresh-cache",
    )
    return ap


def output_dir(args: argparse.Namespace) -> Path:
    """``--out`` if given, else ``docs/`` for the full study and the git-ignored
    ``memwatch_out/validation-fast/`` for ``--fast`` (a smoke run never overwrites the published report)."""
    if args.out is not None:
        return args.out
    return FAST_OUT if args.fast else PUBLISHED


def _train(cfg: StudyConfig, args: argparse.Namespace, started: float) -> tuple[list[RunRecord], Timing]:
    """Train every run of ``cfg`` and save them to ``--cache`` if given."""
    n_runs = sum(len(d.ns) for d in cfg.data) * len(cfg.seeds)
    size = "fast" if args.fast else "fresh" if args.fresh else "default"
    print(f"memwatch validation ({size}): {n_runs} runs", flush=True)
    done, before = [], 0.0
    if args.resume and args.cache is not None and args.cache.exists():
        done, timing = load_cache(args.cache)
        before = timing.seconds
        print(f"resuming: {len(done)} runs already in {args.cache}", flush=True)

    def timing_now() -> Timing:
        size = "--fast" if args.fast else "--fresh" if args.fresh else "default"
        return Timing(
            size=size, seconds=before + time.perf_counter() - started, workers=args.workers, machine=machine()
        )

    def save(runs: list[RunRecord]) -> None:
        if args.cache is not None:
            save_cache(args.cache, runs, timing_now(), cfg)

    runs = run_all(cfg, args.workers, done, save)
    return runs, timing_now()


def main(argv: list[str] | None = None) -> int:
    """Run the study (or analyse a cache) and write the report; return the exit status."""
    ap = parser()
    args = ap.parse_args(argv)
    quiet()
    cfg = FAST if args.fast else FRESH if args.fresh else DEFAULT
    args.train_only = args.train_only or args.fresh
    if args.seeds is not None:
        cfg = replace(cfg, seeds=tuple(args.seeds))
    if args.datasets is not None:
        unknown = set(args.datasets) - {d.name for d in cfg.data}
        if unknown:
            ap.error(f"--datasets: {sorted(unknown)} not in the grid {[d.name for d in cfg.data]}")
        cfg = replace(cfg, data=tuple(d for d in cfg.data if d.name in args.datasets))
    analysable = set(cfg.select_seeds) <= set(cfg.seeds)
    if args.selection_out is not None and args.from_cache is None:
        ap.error("--selection-out reads the runs of --from-cache")
    if args.from_cache is None and (args.train_only or not analysable) and args.cache is None:
        ap.error(f"--train-only, or --seeds without the selection seed(s) {cfg.select_seeds}, needs --cache")
    if args.workers is None:  # --fast: 4 short runs, not worth a worker's start-up
        args.workers = 1 if args.fast else min(2, os.cpu_count() or 1)
    out = output_dir(args)
    started = time.perf_counter()
    if args.from_cache is not None:
        runs, timing = load_cache(*args.from_cache)
    else:
        runs, timing = _train(cfg, args, started)
        if not analysable or args.train_only:
            print(
                f"saved {len(runs)} runs to {args.cache}; analyse them with --from-cache ... --fresh-cache {args.cache}"
            )
            return 0
    from .analysis import analyse  # the training path needs neither
    from .report import selection_report, write_report

    if args.selection_out is not None:
        chosen = [r for r in runs if r.seed in cfg.select_seeds]
        text = selection_report(analyse(chosen, cfg))
        args.selection_out.write_text(text)
        print(text)
        return 0

    fresh, fresh_timing = ([], None) if args.fresh_cache is None else load_cache(*args.fresh_cache)
    text = write_report(analyse(runs, cfg, fresh), out, timing, fresh_timing)
    print(text)
    print(
        f"\nwrote {out / 'validation.md'} and {out / 'img'}/validation_*.png ({time.perf_counter() - started:.0f} s)",
        flush=True,
    )
    return 0
