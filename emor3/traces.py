"""python -m emor3.sft traces: Cold-Start traces for real data, by rejection sampling from a teacher checkpoint.

Published datasets carry no SET responses, so Cold-Start SFT (``emor3.stages.cold_start``) has nothing to learn
from. ``make_traces`` samples ``per_image`` SET responses per image from any Qwen2-VL / Qwen2.5-VL / Qwen3-VL
checkpoint with emor3's sampler and keeps, per image,
the first that passes the paper's format rule and boxes the image's label; ``traces_main`` writes them as a JSONL
manifest (a ``response`` column) that ``--data`` then trains on.
"""

from __future__ import annotations

import argparse
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from emor3.config import OnBadSample, choices
from emor3.data import BUILTIN_NAMES, BytesImage, get_taxonomy, load_dataset, write_manifest
from emor3.data.clip_source import ClipFiles
from emor3.data.dataset import write_atomic
from emor3.data.taxonomy import VIDEO_NAMES
from emor3.engine.prompts import encode_samples
from emor3.engine.sampler import sample
from emor3.stages.build import resolve_device
from emor3.folders import RunFolderError, lock_folder
from emor3.models import Processor, load_pretrained
from emor3.models.checkpoint import read_config
from emor3.rewards import accuracy_reward, format_reward


@dataclass
class TraceReport:
    """What ``make_traces`` sampled and kept. Every sampled response is one of: kept (the image's trace), surplus
    (it passes too, but its image already has one), wrong_label (the paper's format, a wrong or missing box
    content), bad_format (fails the paper's format rule; ``truncated`` of them hit the length cap)."""

    images_tried: int = 0
    sampled: int = 0
    kept: int = 0
    surplus: int = 0
    wrong_label: int = 0
    bad_format: int = 0
    truncated: int = 0
    kept_per_label: Counter = field(default_factory=Counter)

    def summary(self) -> str:
        per_label = ", ".join(f"{k} {v}" for k, v in sorted(self.kept_per_label.items()))
        return (f"{self.kept} traces from {self.images_tried} images tried; {self.sampled} responses sampled: "
                f"{self.kept} kept, {self.surplus} surplus (their image already had one), {self.wrong_label} wrong "
                f"label, {self.bad_format} bad format ({self.truncated} of them truncated)"
                + (f"; kept per label: {per_label}" if per_label else ""))


def trace_order(samples: Sequence, seed: int) -> list[int]:
    """Indices of ``samples`` in the order they are tried: each label's samples in a seeded shuffle, labels taken in
    turn (round robin), so the first traces are spread over the labels."""
    rng = random.Random(f"traces:{seed}")
    by_label: dict[str, list[int]] = {}
    for i, s in enumerate(samples):
        by_label.setdefault(s.label, []).append(i)
    for idx in by_label.values():
        rng.shuffle(idx)
    order, queues = [], [by_label[k] for k in sorted(by_label)]
    while any(queues):
        for q in queues:
            if q:
                order.append(q.pop(0))
    return order


def make_traces(model, processor, dataset, *, n: int, per_image: int, taxonomies: dict, max_new_tokens: int,
                temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 8, seed: int = 0,
                progress: bool = True) -> tuple[dict[int, str], TraceReport]:
    """Rejection sampling of Cold-Start traces: ``per_image`` SET responses per image from ``model`` with emor3's
    sampler, images tried in ``trace_order`` in batches of ``batch_size`` until ``n`` have a trace (or all are
    tried). A response is kept when it passes the paper's format rule and its last box holds the label
    (``format_reward`` and ``accuracy_reward``, read after a Thinking model's reasoning block); each image keeps
    its first such response. -> ({dataset index: response}, TraceReport)."""
    if n <= 0 or per_image <= 0 or batch_size <= 0:
        raise ValueError(f"traces: --n ({n}), --per-image ({per_image}) and --batch-size ({batch_size}) must be "
                         "positive")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    order, kept, report = trace_order(dataset.samples, seed), {}, TraceReport()
    model.eval()
    bar = tqdm(total=n, desc="traces", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(order), batch_size):
        if len(kept) >= n:
            break
        idx = order[start : start + batch_size]
        chunk = [dataset.samples[i] for i in idx]
        batch = encode_samples(processor, chunk, [dataset.image(i) for i in idx], taxonomies).to(device)
        with torch.no_grad():
            roll = sample(model, batch, group_size=per_image, max_new_tokens=max_new_tokens, temperature=temperature,
                          top_p=top_p, stop_token_ids=processor.stop_token_ids,
                          banned_token_ids=processor.banned_token_ids, generator=generator, tokenizer=processor)
        report.images_tried += len(idx)
        for text, p, trunc in zip(roll.texts, roll.prompt_index.tolist(), roll.truncated.tolist()):
            i, smp = idx[p], chunk[p]
            answer = processor.answer(text)
            report.sampled += 1
            if not format_reward(answer):
                report.bad_format += 1
                report.truncated += int(trunc)
            elif not accuracy_reward(answer, smp.label):
                report.wrong_label += 1
            elif i in kept or len(kept) >= n:
                report.surplus += 1
            else:
                kept[i] = answer
                report.kept += 1
                report.kept_per_label[smp.label] += 1
                bar.update(1)
    bar.close()
    return kept, report


def _image_file(s, image_dir: Path | None) -> Path:
    """The file a manifest row points at for sample ``s``: its own path, or, for an image held as bytes (a parquet
    dataset's), those bytes written once to ``image_dir`` under their digest."""
    if isinstance(s.image, (str, Path)):
        return Path(s.image).resolve()
    if isinstance(s.image, BytesImage) and image_dir is not None:
        suffix = Path(s.image.name).suffix if s.image.name else ""
        suffix = suffix or "." + (s.image.open().format or "img").lower()  # PNG -> .png
        path = (image_dir / (s.image.key.split(":", 1)[1] + suffix)).resolve()
        if not path.is_file():
            image_dir.mkdir(parents=True, exist_ok=True)
            write_atomic(path, lambda f: f.write(s.image.data))
        return path
    raise ValueError(f"sample {s.id}: its image is not a file ({type(s.image).__name__}), so a manifest cannot point "
                     "at it; write the dataset to disk first (python -m emor3.data emoscenes)")


def trace_rows(dataset, kept: dict[int, str], *, only_traces: bool = False,
               image_dir: Path | None = None) -> list[dict]:
    """Manifest rows (``emor3.data.load_manifest``'s format) of ``dataset``: image (absolute path), label, taxonomy
    (a built-in one's name), id, the sample's question if any, its other metadata, and ``response`` where ``kept``
    has one (an earlier ``response`` is dropped). ``only_traces``: the traced samples only. ``image_dir``: where
    images held as bytes (a parquet dataset's) are written, so that the rows can point at them."""
    rows = []
    for i, s in enumerate(dataset.samples):
        if only_traces and i not in kept:
            continue
        meta = {k: v for k, v in (s.metadata or {}).items() if k != "response"}
        if isinstance(s.image, ClipFiles):  # a clip: its frame files or clip path, and its rate
            where = {"frames": [str(p.resolve()) for p in s.image.frames]} if s.image.frames else \
                {"video": str(s.image.path.resolve())}
            row = {**meta, **where, "fps": s.image.fps, "label": s.label, "id": s.id}
        else:
            row = {**meta, "image": str(_image_file(s, image_dir)), "label": s.label, "id": s.id}
        if s.taxonomy in BUILTIN_NAMES + VIDEO_NAMES:  # a user taxonomy (a file) is named again with --taxonomy
            row["taxonomy"] = s.taxonomy
        if getattr(s, "question", None):
            row["question"] = s.question
        if i in kept:
            row["response"] = kept[i]
        rows.append(row)
    return rows


TRACES_DESCRIPTION = """Cold-Start-Emo traces for real data, by rejection sampling: sample --per-image SET responses
per image from a teacher checkpoint (any Qwen2-VL / Qwen2.5-VL / Qwen3-VL folder) with emor3's sampler, keep one
per image that passes the paper's format rule and boxes the right label, until --n images have one. Writes a JSONL
manifest of every sample of --data with a `response` column on the traced ones (--only-traces: those alone), so
`python -m emor3.grpo.train --data OUT` trains on the same images with Cold-Start SFT on the traced ones. Prints the
counts: kept, surplus, wrong label, bad format."""


def check_traces_out(out: Path, data: Path) -> Path:
    """``--out`` of traces: refused (RunFolderError) when it is ``--data`` itself, inside the ``--data`` folder, or
    a folder; the manifest it writes must never replace what it reads."""
    out_r, data_r = out.resolve(), data.resolve()
    if out_r == data_r or (data_r.is_dir() and out_r.is_relative_to(data_r)):
        where = "is" if out_r == data_r else "is inside"
        raise RunFolderError(f"python -m emor3.sft traces: --out {out} {where} --data {data}, which it reads; write "
                             f"the manifest elsewhere, e.g. --out {data_r.parent / (data_r.stem + '_traces.jsonl')}")
    if out.is_dir():
        raise RunFolderError(f"python -m emor3.sft traces: --out {out} is a folder; --out names the JSONL manifest to "
                             f"write, e.g. --out {out / 'traces.jsonl'}")
    return out


def traces_main(argv: list[str]) -> TraceReport:
    p = argparse.ArgumentParser(prog="python -m emor3.sft traces", description=TRACES_DESCRIPTION)
    p.add_argument("--teacher", required=True, help="checkpoint folder that samples the responses")
    p.add_argument("--data", required=True, help="dataset in any loader format (manifest, EmoSet, Emotion6, ...)")
    p.add_argument("--out", required=True, help="JSONL manifest to write")
    p.add_argument("--n", type=int, default=100, help="images to trace (the paper: about 100)")
    p.add_argument("--per-image", type=int, default=4, help="responses sampled per image, K")
    p.add_argument("--taxonomy", default="", help="taxonomy of --data when it does not say (mikels8, emotion6, ...)")
    p.add_argument("--split", default=None, help="split of a dataset folder holding several (EmoSet, WebEmo)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (the rollout's: 1.0)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=1024, help="longest response in tokens")
    p.add_argument("--batch-size", type=int, default=8, help="images sampled together")
    p.add_argument("--min-pixels", type=int, default=None, help="image budget (default: the teacher's processor's)")
    p.add_argument("--max-pixels", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--on-bad-sample", default="error", choices=choices(OnBadSample))
    p.add_argument("--only-traces", action="store_true", help="write the traced samples only")
    p.add_argument("--progress", default="true", choices=("true", "false"))
    p.add_argument("--debug", action="store_true", help="show the traceback of an OS error instead of one line")
    a = p.parse_args(argv)
    out_path = check_traces_out(Path(a.out), Path(a.data))
    # one writer per manifest: a lock beside it, held until this command ends
    lock_folder(out_path.parent, "python -m emor3.sft traces", name=f".{out_path.name}.lock")
    vision = read_config(a.teacher).vision
    dataset = load_dataset(a.data, a.taxonomy or None, a.on_bad_sample, split=a.split, min_pixels=a.min_pixels,
                           max_pixels=a.max_pixels, factor=vision.patch_size * vision.spatial_merge_size)
    if dataset.report.n_skipped:
        print(f"[emor3] {dataset.report.summary()}")
    taxonomies = {}
    for s in dataset.samples:
        taxonomies.setdefault(s.taxonomy, dataset.taxonomy if dataset.taxonomy is not None and
                              dataset.taxonomy.name == s.taxonomy else get_taxonomy(s.taxonomy))
    device = resolve_device(a.device)
    model = load_pretrained(a.teacher, dtype=getattr(torch, a.dtype), device=device)
    processor = Processor.from_pretrained(a.teacher, min_pixels=a.min_pixels, max_pixels=a.max_pixels)
    kept, report = make_traces(model, processor, dataset, n=a.n, per_image=a.per_image, taxonomies=taxonomies,
                               max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
                               batch_size=a.batch_size, seed=a.seed, progress=a.progress == "true")
    image_dir = Path(a.out).with_name(Path(a.out).stem + "_images")  # a parquet dataset's images, written once
    out = write_manifest(a.out, trace_rows(dataset, kept, only_traces=a.only_traces, image_dir=image_dir))
    print(f"[emor3] traces: {report.summary()}")
    if report.kept < a.n:
        print(f"[emor3] traces: {a.n} asked, {report.kept} found; raise --per-image, or use a stronger teacher")
    print(f"[emor3] wrote {out} ({sum(1 for _ in open(out, encoding='utf-8'))} rows, {report.kept} with a response)")
    out.with_name(out.name + ".report.json").write_text(json.dumps(
        {**{k: v for k, v in vars(report).items() if k != "kept_per_label"},
         "kept_per_label": dict(report.kept_per_label), "teacher": str(a.teacher), "data": str(a.data),
         "per_image": a.per_image, "n": a.n, "seed": a.seed, "temperature": a.temperature, "top_p": a.top_p}, indent=2))
    return report
