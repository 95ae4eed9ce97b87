"""The single-frame control on EmoScenes clips: does a policy need the change over time?

A checkpoint answers the test clips and the same clips holding their first or last frame (`test_first`,
`test_last`: `emor3.toy.emoscenes_clips`), one sampled SET reply each at the evaluation protocol (temperature 0.6,
top-p 0.95, one seeded generator). Per set and per changed cue (face, sky, object) it reports the accuracy and how
often the boxed label has the right property for the changed cue (valence for the face, arousal for the sky, family
for the object; `changed_cue_right`). An end frame shows the changed cue neutral, so there that rate sits near
50 % (a guess between two labels) whatever the policy learned; on the clips it is what the policy reads from the
middle frames.

    python benchmarks/clip_control.py --model RUN_DIR --data CLIP_DIR [--n 400] [--out control.json]
    python benchmarks/clip_control.py --model RUN_DIR/sft --config RUN_DIR/config.toml --data CLIP_DIR

CLIP_DIR is a folder `python -m emor3.data emoscenes DIR --variant clips` wrote (a clip run's is
`.cache/emoscenes/clips-seed<seed>-...`). The clip budget comes from the run's config.toml (`--model.video-*`).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import torch

from emor3.config import config_from_dict, load_toml
from emor3.toy.emoscenes_clips import CHANGING, changed_cue_right
from emor3.data.loaders import load_manifest
from emor3.data.taxonomy import MIKELS8
from emor3.engine.prompts import encode_samples
from emor3.engine.sampler import sample
from emor3.predict import load_model, predicted_label, resolve_model, run_config
from emor3.rewards import extract_answer

SETS = ("test", "test_first", "test_last")


def replies(model, processor, ds, *, n: int, batch_size: int, generator, temperature: float, top_p: float,
            max_new_tokens: int) -> list[str | None]:
    """The boxed Mikels label (or None) of one sampled reply per sample of the first n."""
    out = []
    for start in range(0, min(n, len(ds)), batch_size):
        idx = range(start, min(start + batch_size, n, len(ds)))
        batch = encode_samples(processor, [ds[i] for i in idx], [ds.image(i) for i in idx], {"mikels8": MIKELS8})
        with torch.no_grad():
            roll = sample(model, batch.to(next(model.parameters()).device), group_size=1,
                          max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                          stop_token_ids=processor.stop_token_ids, banned_token_ids=processor.banned_token_ids,
                          generator=generator, tokenizer=processor)
        out += [predicted_label(extract_answer(processor.answer(t)), MIKELS8) for t in roll.texts]
    return out


def score(ds, labels: list[str | None]) -> dict:
    """Accuracy and changed-cue rate (%), over all samples and per changed cue."""
    groups = defaultdict(list)
    for s, label in zip(ds, labels):
        cues, changed = s.metadata["cues"], s.metadata["changed"]
        row = (label == s.label, changed_cue_right(label, cues, changed))
        groups[changed].append(row)
        groups["all"].append(row)
    pct = lambda xs: round(100.0 * sum(xs) / len(xs), 2) if xs else None  # noqa: E731
    return {k: {"n": len(rows), "accuracy": pct([a for a, _ in rows]), "changed_cue": pct([c for _, c in rows])}
            for k, rows in groups.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a run folder, checkpoint or model folder (as predict takes)")
    p.add_argument("--data", required=True, help="a clip folder with test.jsonl, test_first.jsonl, test_last.jsonl")
    p.add_argument("--n", type=int, default=400, help="clips per set (the first n)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--config", default=None, help="a run's config.toml to take the clip budget and sampling "
                   "settings from (default: the run --model is in)")
    p.add_argument("--out", default=None, help="write the scores as JSON here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    source = resolve_model(a.model)
    run = config_from_dict(load_toml(a.config), a.config).resolved() if a.config else run_config(source)
    if run is None:
        p.error(f"--model {a.model}: not inside a run folder; pass --config RUN_DIR/config.toml (the clip budget)")
    m = run.model
    model, processor = load_model(source, device=m.device, min_pixels=m.min_pixels, max_pixels=m.max_pixels,
                                  clip_budget=dict(fps=m.video_fps or None, max_frames=m.video_max_frames,
                                                   min_pixels=m.min_pixels,
                                                   max_pixels=m.video_max_pixels or m.max_pixels))
    generator = torch.Generator().manual_seed(a.seed)
    results = {}
    for name in SETS:
        ds = load_manifest(Path(a.data) / f"{name}.jsonl", verify="exists")
        labels = replies(model, processor, ds, n=a.n, batch_size=a.batch_size, generator=generator,
                         temperature=run.eval.temperature, top_p=run.eval.top_p,
                         max_new_tokens=run.eval.max_new_tokens)
        results[name] = score(ds, labels)
    print("| set | n | accuracy % | changed cue right % | " + " | ".join(f"{k}: acc / changed %" for k in CHANGING)
          + " |")
    print("|---|---|---|---|" + "---|" * len(CHANGING))
    for name, r in results.items():
        per = " | ".join(f"{r[k]['accuracy']} / {r[k]['changed_cue']}" if k in r else "-" for k in CHANGING)
        print(f"| {name} | {r['all']['n']} | {r['all']['accuracy']} | {r['all']['changed_cue']} | {per} |")
    if a.out:
        Path(a.out).write_text(json.dumps({"model": str(a.model), "data": str(a.data), "seed": a.seed,
                                           "sets": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
