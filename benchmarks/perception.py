"""What a checkpoint perceives in each EmoScenes rendering: the share of true cues its greedy description of an image
("Describe the image.") names, per cue kind, on the in-domain test split and the two out-of-domain renderings.

For the shipped instruct checkpoint (the default ``--model``) this says what the out-of-domain splits can measure:
``ood_render``'s rendering is one the instruct stage trained on, ``ood_unseen``'s one no stage trains on, so a
policy's accuracy on ``ood_unseen`` is bounded by how much of it the model sees at all. The images come from the
benchmark's own splits, never from the instruct stage's scenes.

    python benchmarks/perception.py                        # the shipped instruct checkpoint, seed 0, 64 per split
    python benchmarks/perception.py --model RUN/sft --out runs/perception.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from emor3.config import parse_args
from emor3.stages.build import build
from emor3.toy.emoscenes import make_split
from emor3.toy.instruct import SHIPPED_INSTRUCT, caption_recall
from emor3.toy.world import WORLD

SPLITS = ("test", "ood_render", "ood_unseen")
REPO = Path(__file__).resolve().parents[1]


def default_model() -> Path:
    (only,) = [p for p in SHIPPED_INSTRUCT.iterdir() if p.is_dir()]
    return only


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="checkpoint folder (default: the shipped instruct one)")
    ap.add_argument("--seed", type=int, default=0, help="EmoScenes seed of the images")
    ap.add_argument("--n", type=int, default=64, help="images per split")
    ap.add_argument("--out", type=Path, default=None, help="also write the result as JSON here")
    argv = sys.argv[1:] if argv is None else list(argv)
    a = ap.parse_args(argv)
    model = (a.model or default_model()).resolve()
    name = str(model.relative_to(REPO)) if model.is_relative_to(REPO) else str(model)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = parse_args(["--model.path", str(model), "--out", tmp, "--run.progress", "false", "--run.threads", "1",
                          "--data.emoscenes-train", "8", "--data.emoscenes-test", "0", "--data.emoscenes-ood", "0",
                          "--data.cold-start", "0", "--data.cache-dir", str(Path(tmp) / "cache")], "perception", "")
        run = build(cfg, Path(tmp), WORLD)
        result = {"model": name, "seed": a.seed, "n": a.n, "torch": torch.__version__, "threads": 1,
                  "command": "python benchmarks/perception.py " + " ".join(argv or []), "recall": {}}
        for split in SPLITS:
            samples = make_split(split, a.n, seed=a.seed, image_size=cfg.data.image_size)
            result["recall"][split] = caption_recall(run.model, run.processor, samples,
                                                     [s.open_image() for s in samples], run.device)
    lines = ["| split | face | sky | object | all |", "|---|---|---|---|---|"]
    for split, r in result["recall"].items():
        lines.append(f"| {split} | " + " | ".join(f"{100 * r[k]:.1f}" for k in ("face", "sky", "object", "all"))
                     + " |")
    print(f"cue recall % of greedy descriptions, {name}, seed {a.seed}, {a.n} images per split\n\n" + "\n".join(lines))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
