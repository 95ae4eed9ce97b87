"""Command line: `python -m emor3.data validate PATH`, `... emoscenes OUT_DIR` and `... emoset-subset ROOT OUT_DIR`.

validate: loads a dataset in any supported layout (every split of an EmoSet root, of a folder of manifests or of a
Hugging Face parquet dataset, every split and fold of a DFEW or MAFW root; `PATH@SPLIT` or `--split` picks one),
prints counts per label and every problem found, and exits 1 when there are problems (2 when it cannot load at
all). By default it reports all problems (skip mode); `--on-bad-sample error` stops at the first one. Image shapes
are checked against the image processor's pixel budget: `--min-pixels` / `--max-pixels` / `--factor` (the
run's `--model.min-pixels` / `--model.max-pixels`; Qwen2.5-VL's defaults when not given).

emoscenes: writes the EmoScenes splits as JSONL manifests + PNG images, which `validate` and `load_dataset` read.

emoset-subset: draws the paper's EmoSet subset (2,100 train / 2,000 test by default), seeded and stratified per
label, from a full EmoSet root, and writes it as manifests (`emor3.data.loaders.build_emoset_subset`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from emor3.data.dataset import ON_BAD_SAMPLE, BadSampleError
from emor3.data.loaders import (EMOSET_PAPER_SIZES, EMOSET_SPLITS, WEBEMO_LIST, WEBEMO_SPLITS, load_dataset,
                                 parquet_splits, split_suffix, video_layout)
from emor3.data.video_loaders import FOLDS, LOADERS, SPLITS
from emor3.toy.emoscenes import VARIANTS, write_emoscenes
from emor3.toy.emoscenes_clips import write_emoscenes_clips


def _targets(path: Path, split: str | None) -> list[str | None]:
    """Which splits validate should check under `path`: all of them unless one is named."""
    if split is not None or not path.is_dir():
        return [split]
    video = video_layout(path)
    if video is not None:  # DFEW / MAFW: every split and fold whose split file is there
        split_file = LOADERS[video][1]
        return [f"{s}{k}" for k in FOLDS for s in SPLITS if split_file(path, k, s).is_file()] or [None]
    if any((path / f"{s}.json").is_file() for s in EMOSET_SPLITS) and (path / "image").is_dir():
        return [s for s in EMOSET_SPLITS if (path / f"{s}.json").is_file()]
    if (path / "ground_truth.txt").is_file():
        return [None]
    webemo = [s for s in WEBEMO_SPLITS if (path / WEBEMO_LIST.format(split=s)).is_file()]
    if webemo:
        return webemo
    parquet = parquet_splits(path)
    if parquet:
        return sorted(parquet)
    manifests = sorted(path.glob("*.jsonl"))
    return [m.stem for m in manifests] if len(manifests) > 1 else [None]


def validate(args: argparse.Namespace) -> int:
    try:
        path, split = split_suffix(args.path, args.split)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not path.exists():
        print(f"error: {path} does not exist", file=sys.stderr)
        return 2
    problems = 0
    budget = {k: getattr(args, k) for k in ("min_pixels", "max_pixels", "factor") if getattr(args, k) is not None}
    for split in _targets(path, split):
        name = f"{path}" + (f" [{split}]" if split else "")
        try:
            ds = load_dataset(path, args.taxonomy, args.on_bad_sample, split=split, verify=args.verify, **budget)
        except BadSampleError as e:
            print(f"{name}: PROBLEM: {e}")
            problems += 1
            continue
        except (ValueError, KeyError, FileNotFoundError, ModuleNotFoundError) as e:
            print(f"{name}: cannot load: {e}", file=sys.stderr)
            return 2
        rep = ds.report
        print(f"{name}: {len(ds)} samples, layout {rep.layout}, taxonomy {rep.taxonomy}")
        for note, n in sorted(rep.notes.items()):  # expected in this layout, not problems
            print(f"  note: {note} = {n}")
        width = max(len(lab) for lab in ds.label_counts())
        for lab, n in ds.label_counts().items():
            print(f"  {lab:<{width}}  {n}")
        if rep.skipped:
            problems += rep.n_skipped
            print(f"  PROBLEMS: {rep.n_skipped} bad samples: "
                  + ", ".join(f"{r}={n}" for r, n in sorted(rep.skipped.items())))
            for reason in sorted(rep.examples):
                for msg in rep.examples[reason]:
                    print(f"    {msg}")
                extra = rep.skipped[reason] - len(rep.examples[reason])
                if extra > 0:
                    print(f"    ... and {extra} more {reason}")
    print("OK: no problems found" if not problems else f"FAILED: {problems} problem(s)")
    return 1 if problems else 0


def emoscenes(args: argparse.Namespace) -> int:
    if args.variant == "clips":
        paths = write_emoscenes_clips(args.out_dir, seed=args.seed, n_train=args.n_train, n_test=args.n_test,
                                      n_ood=args.n_ood, image_size=args.image_size, label_noise=args.label_noise,
                                      n_coldstart=args.n_coldstart, overwrite=args.overwrite)
        for split, p in paths.items():
            print(f"{split}: {p}")
        print(f"check with: python -m emor3.data validate {args.out_dir}")
        return 0
    paths = write_emoscenes(args.out_dir, seed=args.seed, n_train=args.n_train, n_test=args.n_test,
                            n_ood=args.n_ood, image_size=args.image_size, label_noise=args.label_noise,
                            n_coldstart=args.n_coldstart, overwrite=args.overwrite, variant=args.variant)
    for split, p in paths.items():
        print(f"{split}: {p}")
    print(f"check with: python -m emor3.data validate {args.out_dir}")
    return 0


def emoset_subset(args: argparse.Namespace) -> int:
    from emor3.data.loaders import build_emoset_subset
    root, _ = split_suffix(args.root)
    if root.suffix == ".parquet" or parquet_splits(root):
        print(f"error: {args.root} is a Hugging Face parquet dataset, not a full EmoSet root: the release's EmoSet2k "
              f"already is the {EMOSET_PAPER_SIZES['train']} / {EMOSET_PAPER_SIZES['test']} subset; pass it to "
              f"--data {root}@train and validate as it is", file=sys.stderr)
        return 2
    sizes = {"train": args.train, "test": args.test}
    try:
        paths = build_emoset_subset(args.root, args.out_dir, sizes={k: n for k, n in sizes.items() if n > 0},
                                    seed=args.seed, on_bad_sample=args.on_bad_sample)
    except (BadSampleError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for split, p in paths.items():
        print(f"{split}: {p}")
    print(f"check with: python -m emor3.data validate {args.out_dir}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from emor3.config import DataConfig  # the defaults of the default run, defined once there
    d = DataConfig()
    p = argparse.ArgumentParser(prog="python -m emor3.data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    v = sub.add_parser("validate", help="check a dataset and print counts per label and problems",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    v.add_argument("path", help="JSONL manifest, folder of manifests, image-folder tree, EmoSet root or split file, "
                                "Hugging Face parquet dataset folder or shard (PATH@SPLIT names a split)")
    v.add_argument("--taxonomy", default=None,
                   help="taxonomy name (mikels8, emotion6, binary, webemo2/7/25) or a TOML/JSON file; "
                        "default: per-row 'taxonomy' fields, else inferred from the labels")
    v.add_argument("--split", default=None, help="only this split (EmoSet train/val/test, a manifest's stem or a "
                                                  "parquet split)")
    v.add_argument("--on-bad-sample", choices=ON_BAD_SAMPLE, default="skip",
                   help="skip: report every problem (default); error: stop at the first one")
    v.add_argument("--verify", choices=("full", "header", "exists"), default="full",
                   help="how much of each image to check: full decode (catches truncation), header, or existence")
    v.add_argument("--min-pixels", type=int, default=None,
                   help="image processor's smallest image area (default: Qwen2.5-VL's 3136)")
    v.add_argument("--max-pixels", type=int, default=None,
                   help="image processor's largest image area, as the run's --model.max-pixels (default: "
                        "Qwen2.5-VL's 1003520)")
    v.add_argument("--factor", type=int, default=None,
                   help="patch size x merge size: image sides are multiples of it (default: 28)")
    v.set_defaults(func=validate)

    e = sub.add_parser("emoscenes", help="write the EmoScenes splits (JSONL manifests + PNG images)",
                       description="Write EmoScenes splits under OUT_DIR: train.jsonl, validation.jsonl, "
                                   "test.jsonl, compositional.jsonl, ood_render.jsonl, ood_unseen.jsonl, "
                                   "ood_emotion6.jsonl, ood_binary.jsonl, coldstart.jsonl and "
                                   "images/<split>/*.png. Deterministic from --seed; a folder already holding the "
                                   "same settings is reused.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("out_dir", help="output folder (created; reused if it holds the same settings)")
    e.add_argument("--seed", type=int, default=0, help="seed of cue draws, rendering jitter and label noise")
    e.add_argument("--n-train", type=int, default=d.emoscenes_train, help="training samples (Mikels' 8)")
    e.add_argument("--n-test", type=int, default=d.emoscenes_test,
                   help="in-domain test samples, and as many validation samples (Mikels' 8)")
    e.add_argument("--n-ood", type=int, default=d.emoscenes_ood,
                   help="samples in each out-of-domain split (compositional, ood_render, ood_unseen, ood_emotion6, "
                        "ood_binary)")
    e.add_argument("--n-coldstart", type=int, default=d.cold_start,
                   help="training samples that get a SET reference response (coldstart.jsonl)")
    e.add_argument("--image-size", type=int, default=d.image_size, help="image side in pixels")
    e.add_argument("--label-noise", type=float, default=d.label_noise,
                   help="probability that a training label is replaced by a random other label")
    e.add_argument("--variant", choices=VARIANTS, default="default",
                   help="default; shortcut: a badge whose colour shows the label on 90%% of train/test images, "
                        "drawn independently of the scene out of domain, plus the ood_shortcut split; conflict: the "
                        "training label follows the badge, which disagrees with the cues on 30%% of training images "
                        "(emor3.toy.emoscenes); clips: 4-8 frame clips whose label needs the change over time, plus "
                        "the single-frame controls test_first and test_last (emor3.toy.emoscenes_clips)")
    e.add_argument("--overwrite", action="store_true", help="regenerate even if OUT_DIR holds the same settings")
    e.set_defaults(func=emoscenes)

    s = sub.add_parser("emoset-subset", help="draw the paper's EmoSet subset (seeded, stratified per label)",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("root", help="full EmoSet root (train.json, test.json, image/, annotation/)")
    s.add_argument("out_dir", help="where train.jsonl, test.jsonl and subset.json are written")
    s.add_argument("--seed", type=int, default=0, help="seed of the draw")
    s.add_argument("--train", type=int, default=EMOSET_PAPER_SIZES["train"], help="training samples (0: none)")
    s.add_argument("--test", type=int, default=EMOSET_PAPER_SIZES["test"], help="test samples (0: none)")
    s.add_argument("--on-bad-sample", choices=ON_BAD_SAMPLE, default="error",
                   help="a bad row of the split files: stop (error) or leave it out of the draw (skip)")
    s.set_defaults(func=emoset_subset)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
