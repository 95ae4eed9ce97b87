"""python -m emor3.predict --model DIR [--adapter DIR] INPUT...: a trained policy's SET reasoning and boxed label
for each image of INPUT (image files, or folders searched recursively for image files); with ``--clips`` for each
clip (a video file, an animated GIF / WebP, or a folder of frames, whose rate ``--fps`` gives).

1. The model: ``--model`` is a Hugging Face Qwen2-VL / Qwen2.5-VL / Qwen3-VL folder, a PEFT adapter folder (its
   ``adapter_config.json`` names the base), a run's ``checkpoint-<step>/`` (``model/``, or ``adapter/`` over the
   model GRPO started from), or a run folder, meaning its newest complete checkpoint. ``--adapter`` puts a PEFT
   adapter folder over a full model. A run's ``config.toml`` supplies the defaults the run was evaluated with:
   pixel budget, taxonomy, sampling settings and the judge's reply length; flags override them. The weights are
   loaded in bfloat16 on CUDA (as the rollout copy of a mixed-precision run), float32 elsewhere (``--dtype``).
2. The prompt is the SET prompt of training and evaluation (``emor3.engine.prompts``), listing ``--taxonomy``'s
   labels. Images are decoded, checked against the processor's pixel budget and resized as a dataset's are, then
   batched through the rollout sampler (``emor3.engine.sampler.sample``, one completion per image) ``--batch-size``
   at a time. Sampling follows the evaluation protocol (temperature 0.6, top-p 0.95) from one generator seeded by
   ``--seed``: the same seed, inputs and batch size give the same output. ``--temperature 0`` is greedy.
3. The label is the taxonomy label equal to the last boxed answer, lower-cased (the paper's accuracy rule), or
   none. ``--reflect`` adds RER's two self-checks, asked of the same model through the training judge
   (``emor3.rewards.reflection.reflect`` and ``ModelJudge``): does step 1 describe the image (consistency), and
   which emotion do steps 1-2 express (coherence), with their replies and scores. Coherence is scored against the
   predicted label, as there is no ground truth; without a predicted label its reply is shown unscored.
4. Clips (``--clips``) get the SET prompt with a video part, sampled and resized at the run's ``--model.video-*``
   settings (a run's config.toml; else the model folder's video processor settings); ``--reflect`` shows the judge
   the clip.
5. An image that cannot be read (missing, empty, corrupt, a shape the processor cannot take) gets one error line
   naming it, and the others go on; the exit status is 1 when any failed.

Text output is one block per image; ``--json`` writes one JSON object per image instead (JSONL), an unreadable
one as ``{"image": ..., "error": ...}``. ``--out FILE`` writes either to FILE instead of stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from tqdm import tqdm

from emor3.config import Config, EvalConfig, config_from_dict, load_toml
from emor3.data import Taxonomy, get_taxonomy
from emor3.data.dataset import (IMAGE_SHAPE, UNREADABLE_IMAGE, BadSampleError, decode_image, image_shape_problem,
                                smart_resize)
from emor3.engine.prompts import build_set_messages
from emor3.engine.sampler import sample
from emor3.checkpoints import latest_checkpoint
from emor3.stages.build import resolve_device
from emor3.models import Processor, load_pretrained
from emor3.models.clips import Clip, read_clip
from emor3.models.lora import ADAPTER_CONFIG, load_adapter, read_adapter_config
from emor3.rewards import extract_answer, format_reward, parse_set
from emor3.rewards.reflection import ModelJudge, reflect

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DTYPES = ("auto", "float32", "bfloat16", "float16")


# --------------------------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class ModelSource:
    """Where a policy's weights are: a full model folder, an optional adapter over it, and the run it comes from."""

    weights: Path  # a Hugging Face folder (config.json, safetensors, tokenizer and processor files)
    adapter: Path | None = None  # a PEFT adapter folder put over ``weights``
    run_dir: Path | None = None  # the run folder (its config.toml), when --model points into a run


def _adapter_base(adapter: Path, run_dir: Path | None) -> Path:
    """The model an adapter folder was trained over: its ``base_model_name_or_path``, else the run's Cold-Start
    checkpoint (a run folder that was moved keeps its ``sft/``)."""
    named = read_adapter_config(adapter).get("base_model_name_or_path")
    for base in ([Path(named)] if named else []) + ([run_dir / "sft"] if run_dir is not None else []):
        if (base / "config.json").is_file():
            return base
    raise FileNotFoundError(f"{adapter / ADAPTER_CONFIG}: its base model {named!r} is not a model folder here; "
                            "pass the base as --model and the adapter as --adapter")


def resolve_model(model: str | Path, adapter: str | Path | None = None) -> ModelSource:
    """What ``--model`` / ``--adapter`` name (module docstring, point 1); errors name the folder and what it lacks."""
    path = Path(model)
    if not path.is_dir():
        raise FileNotFoundError(f"--model {path}: no such folder")
    if (path / "config.json").is_file():
        source = ModelSource(path)
    elif (path / ADAPTER_CONFIG).is_file():
        source = ModelSource(_adapter_base(path, None), path)
    elif (path / "model" / "config.json").is_file() or (path / "adapter" / ADAPTER_CONFIG).is_file():
        run = path.parent if (path.parent / "config.toml").is_file() else None
        if (path / "model" / "config.json").is_file():
            source = ModelSource(path / "model", None, run)
        else:
            source = ModelSource(_adapter_base(path / "adapter", run), path / "adapter", run)
    elif (checkpoint := latest_checkpoint(path)) is not None:
        return resolve_model(checkpoint, adapter)
    else:
        raise FileNotFoundError(f"--model {path}: not a model folder (config.json), an adapter folder "
                                f"({ADAPTER_CONFIG}), a run checkpoint (model/ or adapter/) or a run folder with a "
                                "complete checkpoint-<step>/")
    if adapter is not None:
        if source.adapter is not None:
            raise ValueError(f"--adapter {adapter}: --model {path} holds an adapter already ({source.adapter})")
        source = ModelSource(source.weights, Path(adapter), source.run_dir)
    return source


def run_config(source: ModelSource) -> Config | None:
    """The settings of the run a checkpoint comes from (its config.toml, resolved), or None outside a run."""
    if source.run_dir is None:
        return None
    f = source.run_dir / "config.toml"
    return config_from_dict(load_toml(f), str(f)).resolved()


def load_model(source: ModelSource, *, dtype: str = "auto", device: str = "auto", min_pixels: int | None = None,
               max_pixels: int | None = None, clip_budget: dict | None = None) -> tuple[torch.nn.Module, Processor]:
    """The policy (weights, then the adapter if any) in eval mode, and its processor at the given pixel budget
    (None: the folder's preprocessor_config.json) and clip budget (`Processor.set_clip_budget`'s keywords; None: the
    folder's). dtype "auto": bfloat16 on CUDA, float32 elsewhere."""
    dev = resolve_device(device)
    if dtype == "auto":
        dtype = "bfloat16" if dev.type == "cuda" else "float32"
    model = load_pretrained(source.weights, dtype=getattr(torch, dtype), device=dev)
    if source.adapter is not None:
        load_adapter(model, source.adapter)  # adapters are made on the weights' device
    processor = Processor.from_pretrained(source.weights, min_pixels=min_pixels, max_pixels=max_pixels)
    if clip_budget is not None:
        processor.set_clip_budget(**clip_budget)
    return model.eval(), processor


# --------------------------------------------------------------------------------------------- inputs


def collect_inputs(inputs: Sequence[str | Path]) -> list[tuple[Path, str | None]]:
    """[(image file, None)] in input order, with (input, problem) in place of an input that yields none. A file is
    taken whatever its name; a folder contributes its files with an image suffix (``IMAGE_SUFFIXES``),
    recursively, sorted."""
    entries: list[tuple[Path, str | None]] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            entries += [(p, None) for p in found] or [
                (item, f"no image files ({', '.join(IMAGE_SUFFIXES)}) in this folder")]
        elif item.exists():
            entries.append((item, None))
        else:
            entries.append((item, "no such file or folder"))
    return entries


def collect_clips(inputs: Sequence[str | Path]) -> list[tuple[Path, str | None]]:
    """[(clip, None)] in input order, each input one clip (a file, or a folder of frames), with (input, problem)
    for one that does not exist."""
    return [(p, None if p.exists() else "no such file or folder") for p in map(Path, inputs)]


def load_clip(path: Path, fps: float | None) -> Clip:
    """Every frame of a clip, decoded now; a BadSampleError naming it when it cannot be read."""
    try:
        return read_clip(path, fps=fps)
    except (ValueError, OSError, ImportError) as e:
        raise BadSampleError(UNREADABLE_IMAGE, f"the clip cannot be read ({e})", file=path) from None


def load_image(path: Path, processor: Processor) -> Image.Image:
    """The decoded RGB image resized to the processor's pixel budget on the model's grid, as a dataset resizes it
    for training and evaluation; a BadSampleError naming the file when it cannot be used."""
    img = decode_image(path)
    ip = processor.image_processor
    factor = ip.patch_size * processor.merge_size
    budget = dict(factor=factor, min_pixels=ip.size.shortest_edge, max_pixels=ip.size.longest_edge)  # pixel areas
    problem = image_shape_problem(img.width, img.height, **budget)
    if problem is not None:
        raise BadSampleError(IMAGE_SHAPE, problem, file=path)
    h, w = smart_resize(img.height, img.width, **budget)
    return img if (h, w) == (img.height, img.width) else img.resize((w, h), Image.Resampling.BICUBIC)


# --------------------------------------------------------------------------------------------- prediction


def predicted_label(answer: str | None, taxonomy: Taxonomy) -> str | None:
    """The taxonomy label the boxed answer names under the paper's accuracy rule (lower-cased equality), or None."""
    if answer is None:
        return None
    return next((label for label in taxonomy.labels if label.lower() == answer), None)


def predict_batch(model, processor: Processor, paths: Sequence[Path], images: Sequence[Image.Image],
                  taxonomy: Taxonomy, *, generator: torch.Generator, temperature: float, top_p: float,
                  max_new_tokens: int, judge: ModelJudge | None = None) -> list[dict]:
    """One record per image: its SET completion, the parsed steps, the boxed answer and label, and with ``judge``
    RER's consistency and coherence replies and scores (None where the judge was not asked or there is no label)."""
    messages = [build_set_messages(taxonomy, video=isinstance(im, Clip)) for im in images]
    batch = processor.encode_prompts(messages, [[im] for im in images]).to(next(model.parameters()).device)
    with torch.no_grad():
        rollout = sample(model, batch, group_size=1, max_new_tokens=max_new_tokens, temperature=temperature,
                         top_p=top_p, stop_token_ids=processor.stop_token_ids,
                         banned_token_ids=processor.banned_token_ids, generator=generator, tokenizer=processor)
    answers = [processor.answer(t) for t in rollout.texts]  # a Thinking model's reasoning block is not parsed
    records = []
    for path, text, answer, truncated in zip(paths, rollout.texts, answers, rollout.truncated.tolist()):
        steps = parse_set(answer)
        boxed = extract_answer(answer)
        records.append({"image": str(path), "label": predicted_label(boxed, taxonomy), "answer": steps.answer,
                        "format": bool(format_reward(answer)),
                        "steps": {"step1": steps.step1, "step2": steps.step2, "step3": steps.step3},
                        "completion": text, "truncated": bool(truncated)})
    if judge is not None:
        # coherence is scored against the predicted label; a row without one is judged against the first label
        # (the judge's prompt does not depend on it) and its score dropped
        targets = [r["label"] or taxonomy.labels[0] for r in records]
        res = reflect(answers, targets, taxonomy, list(images), judge, mode="sample")
        for i, r in enumerate(records):
            asked_cons, asked_coh = bool(res.judged_consistency[i]), bool(res.judged_coherence[i])
            r["consistency"] = {"reply": res.consistency_replies[i],
                                "score": float(res.consistency[i]) if asked_cons else None}
            r["coherence"] = {"reply": res.coherence_replies[i],
                              "score": float(res.coherence[i]) if asked_coh and r["label"] else None}
    return records


def _one_line(text: str | None) -> str:
    return " ".join((text or "").split())


def format_record(r: dict, taxonomy: Taxonomy) -> str:
    """The text block of one record: the image, the three steps (or the raw reply), the label, the self-checks."""
    if "error" in r:
        return f"{r['image']}\n  error: {r['error']}\n"
    lines = [r["image"]]
    steps = r["steps"]
    if any(steps.values()):
        for k in (1, 2, 3):
            lines.append(f"  step {k}: {_one_line(steps[f'step{k}']) or '(missing)'}")
    if not r["format"]:
        lines.append(f"  reply (not in the SET format{', cut at the token limit' if r['truncated'] else ''}): "
                     f"{_one_line(r['completion'])!r}")
    if r["label"] is not None:
        lines.append(f"  label: {r['label']}")
    elif r["answer"] is None:
        lines.append("  label: none (no \\boxed{} answer)")
    else:
        lines.append(f"  label: none ({r['answer']!r} is not a {taxonomy.name} label)")
    for check in ("consistency", "coherence"):
        if check in r:
            c = r[check]
            if c["reply"] is None:
                lines.append(f"  {check}: not asked (step {'1' if check == 'consistency' else '1 or 2'} missing)")
            else:
                score = "unscored: no label" if c["score"] is None else f"score {c['score']:g}"
                lines.append(f"  {check}: {_one_line(c['reply'])!r} ({score})")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- the command


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m emor3.predict", description=(__doc__ or "").strip(),
                                usage="%(prog)s --model DIR [--adapter DIR] [options] INPUT [INPUT ...]",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="Image files or folders (searched recursively); with "
                   "--clips, clips.")
    p.add_argument("--clips", action="store_true", help="Each INPUT is one clip: a video file (PyAV), an animated "
                   "GIF / WebP, or a folder of frames.")
    p.add_argument("--fps", type=float, default=None, help="Frame rate of the clips (needed for folders of frames; "
                   "overrides a file's own).")
    p.add_argument("--model", required=True, help="A Hugging Face model folder, a PEFT adapter folder, a run's "
                                                  "checkpoint-<step>/ or a run folder (its newest checkpoint).")
    p.add_argument("--adapter", default=None, help="A PEFT adapter folder to put over --model.")
    p.add_argument("--taxonomy", default=None, help="The label list the prompt offers: a taxonomy name (mikels8, "
                   "emotion6, binary, webemo7, ...) or a TOML/JSON file (default: the run's, else mikels8).")
    p.add_argument("--reflect", action="store_true", help="Also ask RER's two self-checks (consistency: does step "
                   "1 describe the image; coherence: which emotion do steps 1-2 express) and show their scores.")
    p.add_argument("--json", action="store_true", help="Write one JSON object per image (JSONL) instead of text.")
    p.add_argument("--out", default=None, help="Write the output to this file instead of stdout.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the sampling generator (default: 0).")
    p.add_argument("--temperature", type=float, default=None,
                   help=f"Sampling temperature; 0 is greedy, the judge's too (default: the run's, else "
                        f"{EvalConfig.temperature}).")
    p.add_argument("--top-p", type=float, default=None,
                   help=f"Nucleus threshold (default: the run's, else {EvalConfig.top_p}).")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"Longest completion in tokens (default: the run's, else {EvalConfig.max_new_tokens}).")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"Images per sampler batch (default: the run's, else {EvalConfig.batch_size}).")
    p.add_argument("--min-pixels", type=int, default=None,
                   help="Smallest image area after resizing (default: the run's, else the model folder's "
                        "preprocessor_config.json).")
    p.add_argument("--max-pixels", type=int, default=None, help="Largest image area after resizing (default as "
                                                                "--min-pixels).")
    p.add_argument("--dtype", choices=DTYPES, default="auto",
                   help="Weights dtype; auto: bfloat16 on CUDA, float32 elsewhere (default: auto).")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N (default: auto).")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: torch's default).")
    p.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                   help="Progress bar on stderr: auto shows it when an INPUT is a folder (default: auto).")
    return p


def _pick(flag, run_value):
    """A flag's value when given, else the run's."""
    return flag if flag is not None else run_value


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    try:
        source = resolve_model(a.model, a.adapter)
        run = run_config(source)
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    ev = run.eval if run is not None else EvalConfig()
    temperature, top_p = _pick(a.temperature, ev.temperature), _pick(a.top_p, ev.top_p)
    max_new_tokens, batch_size = _pick(a.max_new_tokens, ev.max_new_tokens), _pick(a.batch_size, ev.batch_size)
    if temperature < 0 or not 0 < top_p <= 1 or max_new_tokens < 1 or batch_size < 1:
        p.error(f"need --temperature >= 0, 0 < --top-p <= 1, --max-new-tokens >= 1 and --batch-size >= 1; got "
                f"{temperature}, {top_p}, {max_new_tokens}, {batch_size}")
    try:
        taxonomy = get_taxonomy(_pick(a.taxonomy, (run.data.taxonomy if run is not None else "") or "mikels8"))
    except (KeyError, FileNotFoundError, ValueError) as e:
        p.error(f"--taxonomy: {e.args[0] if e.args else e}")
    if a.threads:
        torch.set_num_threads(a.threads)
    model, processor = load_model(
        source, dtype=a.dtype, device=a.device,
        min_pixels=_pick(a.min_pixels, run.model.min_pixels if run is not None else None),
        max_pixels=_pick(a.max_pixels, run.model.max_pixels if run is not None else None),
        clip_budget=None if run is None else dict(
            fps=run.model.video_fps or None, max_frames=run.model.video_max_frames,
            min_pixels=_pick(a.min_pixels, run.model.min_pixels),
            max_pixels=run.model.video_max_pixels or _pick(a.max_pixels, run.model.max_pixels)))
    generator = torch.Generator().manual_seed(a.seed)  # on the CPU: a seed draws the same numbers on any device
    judge = None
    if a.reflect:
        judge_kw = {"max_new_tokens": run.reward.judge_max_new_tokens} if run is not None else {}
        if temperature == 0:
            judge_kw["temperature"] = 0.0
        judge = ModelJudge(model, processor, seed=generator, **judge_kw)

    entries = collect_clips(a.inputs) if a.clips else collect_inputs(a.inputs)
    out = open(a.out, "w", encoding="utf-8") if a.out else sys.stdout
    show_bar = a.progress == "on" or (a.progress == "auto" and any(Path(i).is_dir() for i in a.inputs))
    bar = tqdm(total=len(entries), desc="predict", unit="image", disable=not show_bar, dynamic_ncols=True,
               file=sys.stderr)
    failed = 0

    def emit(record: dict) -> None:
        nonlocal failed
        if "error" in record:
            failed += 1
            tqdm.write(f"error: {record['image']}: {record['error']}", file=sys.stderr)
        if a.json or "error" not in record:
            text = json.dumps(record) if a.json else format_record(record, taxonomy)
            if out is sys.stdout:
                tqdm.write(text.rstrip("\n"), file=out)
            else:
                out.write(text.rstrip("\n") + "\n")
                out.flush()

    try:
        for start in range(0, len(entries), batch_size):
            chunk = [f for f, _ in entries[start:start + batch_size]]
            loaded: dict[int, Image.Image | Clip] = {}
            errors = {i: problem for i, (_, problem) in enumerate(entries[start:start + batch_size]) if problem}
            for i, f in enumerate(chunk):
                if i in errors:
                    continue
                try:
                    loaded[i] = load_clip(f, a.fps) if a.clips else load_image(f, processor)
                except BadSampleError as e:
                    errors[i] = f"{e.problem} [{e.reason}]"
            done = iter(predict_batch(model, processor, [chunk[i] for i in loaded], list(loaded.values()), taxonomy,
                                      generator=generator, temperature=temperature, top_p=top_p,
                                      max_new_tokens=max_new_tokens, judge=judge) if loaded else [])
            for i, f in enumerate(chunk):
                emit({"image": str(f), "error": errors[i]} if i in errors else next(done))
            bar.update(len(chunk))
    finally:
        bar.close()
        if out is not sys.stdout:
            out.close()
    if failed:
        print(f"[emor3] {failed} of {len(entries)} input(s) failed; see the errors above",
              file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
