"""Small synthetic datasets in the published layouts, and a tiny base checkpoint, for examples/walkthrough.sh.

    python examples/walkthrough_data.py layouts OUT [--seed N] [--per-label K]
    python examples/walkthrough_data.py tiny-model OUT [--seed N]

`layouts` draws EmoScenes images (emor3.toy.emoscenes: the label follows a rule over visible cues, so a tiny model
can learn it) and writes them the way each dataset is distributed:
- OUT/EmoSet: `train.json` / `val.json` / `test.json` (rows `[emotion, image_id, image_path, annotation_path]`),
  `image/<emotion>/<id>.jpg`, `annotation/<emotion>/<id>.json`; Mikels' 8, base rendering. The paper's subset is
  drawn from it by `python -m emor3.data emoset-subset`.
- OUT/Emotion6_train and OUT/Emotion6_test: Emotion6 as distributed, `images/<keyword>/<n>.jpg` and
  `ground_truth.txt` (valence, arousal, seven probabilities); Emotion6 ships as one tree without a split, so the
  walkthrough writes two. Shifted rendering (another palette, size and layout): a second domain.
- OUT/WebEmo: `test25.txt` (`<url> <label index>`), `category.txt` (`('leaf', 'parent', '+')` per index) and the
  "downloaded" images under `images/`, plus two listed URLs never downloaded (counted by the loader, as with
  dead links). Labels come from the valence; evaluate it at the binary level.
`tiny-model` writes a random-init tiny Qwen2.5-VL-architecture checkpoint folder (config, safetensors, tokenizer,
preprocessor config), the stand-in for a published checkpoint: the tokenizer is trained offline on the prompts of
Mikels' 8, Emotion6 and binary, as a `--model.tiny` run trains its own.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from emor3.toy.emoscenes import make_split
from emor3.data.taxonomy import get_taxonomy

E6_COLUMNS = ("anger", "disgust", "fear", "joy", "sadness", "surprise", "neutral")
E6_HEADER = "[image_filename]\t[valence]\t[arousal]\t" + "\t".join(f"[prob. {c}]" for c in E6_COLUMNS)


def _save(sample, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sample.image.open().convert("RGB").save(path, quality=95)


def write_emoset(root: Path, per_label: int, seed: int) -> None:
    """EmoSet's layout; each split is balanced over Mikels' 8 (per_label images per label and split)."""
    for split, n in (("train", 4 * per_label), ("val", per_label), ("test", 2 * per_label)):
        base = "test" if split != "train" else "train"  # EmoScenes' base-rendering splits
        rows = []
        for k, s in enumerate(make_split(base, 8 * n, seed=seed + {"train": 0, "val": 1, "test": 2}[split])):
            iid = f"{s.label}_{split}_{k:05d}"
            img, ann = f"image/{s.label}/{iid}.jpg", f"annotation/{s.label}/{iid}.json"
            _save(s, root / img)
            cues = s.metadata["cues"]
            (root / ann).parent.mkdir(parents=True, exist_ok=True)
            (root / ann).write_text(json.dumps({"emotion": s.label, "brightness": 0.5, "colorfulness": 0.5,
                                                "scene": cues["sky"], "object": [cues["object"]],
                                                "facial_expression": cues["face"]}) + "\n")
            rows.append([s.label, iid, img, ann])
        (root / f"{split}.json").write_text(json.dumps(rows) + "\n")


def write_emotion6(root: Path, n: int, seed: int) -> None:
    """Emotion6's layout: the keyword folder is the label and its probability is the largest (0.6)."""
    e6 = get_taxonomy("emotion6")
    lines, count = [E6_HEADER], {}
    for s in make_split("ood_emotion6", n, seed=seed):
        count[s.label] = count.get(s.label, 0) + 1
        name = f"{s.label}/{count[s.label]}.jpg"
        _save(s, root / "images" / name)
        probs = [0.6 if c == s.label else 0.06 for c in E6_COLUMNS[:6]] + [0.1]
        valence = 6.5 if e6.valence.get(s.label) == "positive" else 3.0
        lines.append("\t".join([name, f"{valence}", "5.0"] + [f"{p:g}" for p in probs]))
    (root / "ground_truth.txt").write_text("\n".join(lines) + "\n")


def write_webemo(root: Path, n: int, seed: int) -> None:
    """WebEmo's layout for a test list only (WebEmo is out-of-domain in both settings)."""
    root.mkdir(parents=True, exist_ok=True)
    w25 = get_taxonomy("webemo25")
    cats = [(leaf, w25.parents[leaf], "+" if w25.valence[leaf] == "positive" else "-") for leaf in w25.labels]
    (root / "category.txt").write_text("".join(f"('{a}', '{b}', '{c}')\n" for a, b, c in cats))
    index = {"positive": w25.labels.index("cheerfulness"), "negative": w25.labels.index("rage")}
    lines = []
    for k, s in enumerate(make_split("ood_binary", n, seed=seed)):
        name = f"220_F_{seed}_{k:05d}.jpg"
        _save(s, root / "images" / name)
        lines.append(f"https://example.com/webemo/{name} {index[s.label]}")
    lines += [f"https://example.com/webemo/dead_{k}.jpg {index['positive']}" for k in range(2)]
    (root / "test25.txt").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python examples/walkthrough_data.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    lay = sub.add_parser("layouts", help="EmoSet, Emotion6 and WebEmo trees in their published layouts")
    lay.add_argument("out", type=Path)
    lay.add_argument("--seed", type=int, default=0)
    lay.add_argument("--per-label", type=int, default=4, help="EmoSet val images per label (train: 4x, test: 2x)")
    tiny = sub.add_parser("tiny-model", help="a random-init tiny checkpoint folder")
    tiny.add_argument("out", type=Path)
    tiny.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.command == "layouts":
        k = a.per_label
        write_emoset(a.out / "EmoSet", k, a.seed)
        write_emotion6(a.out / "Emotion6_train", 12 * k, a.seed + 10)
        write_emotion6(a.out / "Emotion6_test", 6 * k, a.seed + 11)
        write_webemo(a.out / "WebEmo", 4 * k, a.seed + 12)
        print(f"wrote {a.out}/EmoSet, Emotion6_train, Emotion6_test, WebEmo")
    else:
        from emor3.toy.model import tokenizer_corpus
        from emor3.toy.model import build_tiny_checkpoint
        taxonomies = [get_taxonomy(t) for t in ("mikels8", "emotion6", "binary")]
        build_tiny_checkpoint(a.out, tokenizer_corpus(taxonomies), seed=a.seed, vocab_size=1024)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
