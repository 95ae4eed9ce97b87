"""One-shot GPU check of the paper's scale: parity, rollout speed and GRPO steps on the full-depth Qwen2.5-VL-3B.

Three parts, each in up to three variants: eager, with the sampler's CUDA-graph decode step (``compile="graph"``;
parity has no such variant) and with ``torch.compile``. By default on a GPU (``GPU_DEFAULT_PARTS``, about 8
minutes on one 80-140 GB GPU): parity eager, the sampler with the graph (timed against eager sampling and
``generate``), GRPO eager and with the graph. Random weights: nothing is downloaded; the model has the published
3B config, 151k vocabulary included, and a small offline tokenizer.
  1. parity: our model and transformers' ``Qwen2_5_VLForConditionalGeneration`` holding the same bf16 tensors,
     logits and teacher-forced log-probs on a batch with a 448-px image, each side's distance from the float32
     computation of the same weights beside (compiled: our forward under ``torch.compile``);
  2. sampler: ``emor3.engine.sampler.sample`` against transformers' ``generate`` at B 8 x G 8 rows x 512 new tokens
     (no stop token, so every row runs the full length), a 448-px image per prompt: the medians of 3 rounds, each
     timing every contender once in turn (graph and compiled: eager sampling timed beside; compiled: ``generate``
     with its static cache, which it compiles itself);
  3. GRPO: three steps of ``python -m emor3.grpo.train``'s loop (``train(cfg)``) with the EmoSet recipe's
     settings (fp32 master weights, bf16 compute, gradient checkpointing, the RER judge, two updates per rollout
     batch) at 8 prompts x G 8 x 512 new tokens on 448-px EmoScenes images: seconds per step, tokens/s, peak memory,
     next to the memory plan's estimate (compiled: the sampler's decode step under ``torch.compile``).
Writes ``OUT/gpu_check.json`` and ``OUT/gpu_check.md`` after every part (eager parts first), so a check stopped by
its time limit keeps what it measured. A part that fails records its error and the rest still run.

    benchmarks/gpu_check.sh                                # on the GPU machine (about 8 minutes)
    .venv/bin/python benchmarks/gpu_check.py --cpu-smoke   # the same code on the tiny model, CPU, ~1 minute

``--cpu-smoke`` runs every part on the tiny model in fp32 on the CPU with tiny sizes, ``compile`` through
torch.compile's "eager" backend (tracing without code generation); ``tests/test_gpu_check.py`` runs it, so this
script cannot rot between GPU sessions.

Shape legend: B prompts, G samples per prompt, N = B·G rows, T new tokens, V vocabulary.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_sampler import banned_ids, make_batch  # noqa: E402

from emor3.config import config_from_dict, load_toml  # noqa: E402
from emor3.engine.sampler import sample  # noqa: E402
from emor3.memory import GiB, estimate, param_counts, plan_from_config, run_table  # noqa: E402
from emor3.models import QwenVL, save_pretrained, tiny_config  # noqa: E402
from emor3.models.checkpoint import read_config  # noqa: E402
from emor3.models.qwen_vl import RMSNorm  # noqa: E402
from emor3.toy.model import build_tiny_tokenizer, write_preprocessor_config  # noqa: E402

RECIPE = REPO / "examples" / "emoset_qwen2_5_vl_3b.toml"
# about 8 minutes on one H200: bf16 parity at the float32 floor, the CUDA-graph sampler against eager sampling and
# generate (which covers the eager sampler too), three GRPO steps eager and with the graph. torch.compile variants
# (inductor compiles for minutes at 3B) run when asked: --variants compiled, or e.g. --parts sampler:compiled.
GPU_DEFAULT_PARTS = "parity:eager,grpo:eager,sampler:graph,grpo:graph"

# sizes of each part: the GPU check, and the CPU smoke test that keeps the code running
SIZES = {
    "gpu": dict(model="qwen2.5-vl-3b", dtype="bfloat16", device="cuda", prompts=8, group=8, new_tokens=512,
                image_px=448, grpo_steps=3, grpo_prompts=8, grpo_mini=4, micro_rows=16, compile=True, repeats=3,
                parity_logits_tol=3e-2, parity_logprob_tol=5e-2),
    "cpu-smoke": dict(model="tiny", dtype="float32", device="cpu", prompts=2, group=2, new_tokens=8, image_px=56,
                      grpo_steps=2, grpo_prompts=2, grpo_mini=1, micro_rows=2, compile="eager", repeats=2,
                      parity_logits_tol=1e-4, parity_logprob_tol=1e-4),
}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peak_gib(device: str) -> float | None:
    return round(torch.cuda.max_memory_allocated() / GiB, 2) if device.startswith("cuda") else None


# --------------------------------------------------------------------------------------------- models


@torch.no_grad()
def random_model(cfg, dtype: torch.dtype, device: str, seed: int = 0) -> QwenVL:
    """transformers' init (normal(0, 0.02) weights, zero biases, unit norms) drawn on the device itself: the CPU
    ``init_weights`` would spend minutes on 3.75B random numbers."""
    with torch.device(device):
        model = QwenVL(cfg)
    g = torch.Generator(device=device).manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, (torch.nn.Linear, torch.nn.Conv3d, torch.nn.Embedding)):
            mod.weight.normal_(0.0, 0.02, generator=g)
            if getattr(mod, "bias", None) is not None:
                mod.bias.zero_()
        elif isinstance(mod, (RMSNorm, torch.nn.LayerNorm)):
            mod.weight.fill_(1.0)
            if getattr(mod, "bias", None) is not None:
                mod.bias.zero_()
    return model.to(dtype).eval()


def transformers_twin(model: QwenVL):
    """transformers' Qwen2.5-VL holding our very tensors (built on the meta device, parameters assigned), so the
    weights exist once; only its rotary buffers are its own."""
    import transformers

    hfc = transformers.Qwen2_5_VLConfig.from_dict(model.config.to_dict())
    with torch.device("meta"):
        hf = transformers.Qwen2_5_VLForConditionalGeneration(hfc)

    def key(k: str) -> str:
        return ("model.language_model." + k[6:]) if k.startswith("model.") else ("model." + k) \
            if k.startswith("visual.") else k

    sd = {key(k): v for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.language_model.embed_tokens.weight"]
    hf.load_state_dict(sd, strict=True, assign=True)
    device = next(model.parameters()).device
    with torch.device(device):
        hf.model.visual.rotary_pos_emb = type(hf.model.visual.rotary_pos_emb)(hfc.vision_config)
        hf.model.language_model.rotary_emb = type(hf.model.language_model.rotary_emb)(config=hfc.text_config)
    return hf.eval()


# --------------------------------------------------------------------------------------------- parts


def part_parity(s: dict, model: QwenVL, hf, compile) -> dict:
    """Logits and teacher-forced log-probs against transformers holding the same tensors. In bf16 both sides round
    differently at every layer, so the measure is each one's distance from the float32 computation of the same
    weights (transformers' float32 twin): ours must be about as close to it as transformers' own bf16 forward is
    (``ok``: at most 1.5x its error, or within the absolute tolerances)."""
    cfg = model.config
    grid = s["image_px"] // cfg.vision.patch_size
    batch = make_batch(cfg, 2, seed=3, device=s["device"], grid_side=grid)
    ids, am = batch.input_ids, batch.attention_mask
    T = 8
    forward = torch.compile(model.forward, backend=compile if isinstance(compile, str) else "inductor") \
        if compile else model.forward
    valid = am.bool()

    def hf_logits(m):
        return m(input_ids=ids, attention_mask=am, position_ids=batch.position_ids, pixel_values=batch.pixel_values,
                 image_grid_thw=batch.image_grid_thw).logits.float()

    def target_logprobs(logits):  # (2, T): log-probs of the last T tokens, each from the position before
        return torch.log_softmax(logits, -1)[:, -T - 1:-1].gather(-1, ids[:, -T:, None]).squeeze(-1)

    def errors(logits, ref):  # (max |diff| / max |ref| over valid tokens, max log-prob diff of the last T targets)
        rel = float((ref - logits)[valid].abs().max() / ref[valid].abs().max().clamp(min=1))
        return rel, float((target_logprobs(logits) - target_logprobs(ref)).abs().max())

    with torch.no_grad():
        ref = hf_logits(hf)
        emb = model.encode_images(batch.pixel_values, batch.image_grid_thw)
        t0 = time.perf_counter()
        hidden = forward(ids, batch.position_ids, am, image_embeds=emb)
        sync(s["device"])
        first_call_s = time.perf_counter() - t0
        out = model.logits(hidden).float()
        rel, _ = errors(out, ref)
        lp = model.logprobs_from_hidden(hidden[:, -T - 1:-1], ids[:, -T:])
        lp_err = float((lp - target_logprobs(ref)).abs().max())
        res = {"logits_rel_err": rel, "logprob_abs_err": lp_err, "prompt_len": ids.shape[1],
               "forward_first_call_s": round(first_call_s, 2), "tolerances": [s["parity_logits_tol"],
                                                                              s["parity_logprob_tol"]]}
        if next(model.parameters()).dtype != torch.float32:  # the float32 floor: both sides against float32
            try:
                truth = hf_logits(hf.float())  # in place: converted back below
            finally:
                hf.to(next(model.parameters()).dtype)
            res["ours_vs_fp32"] = errors(out, truth)
            res["transformers_vs_fp32"] = errors(ref, truth)
    within = rel <= s["parity_logits_tol"] and lp_err <= s["parity_logprob_tol"]
    floor = "ours_vs_fp32" in res and all(o <= 1.5 * t for o, t in zip(res["ours_vs_fp32"],
                                                                        res["transformers_vs_fp32"]))
    res["ok"] = within or floor
    return res


def part_sampler(s: dict, model: QwenVL, hf, compile) -> dict:
    """Rollout time of ``sample`` (in the variant, and eager beside a graph or compiled variant) and of transformers'
    ``generate`` on the same batch: each called once to warm up (and compile), then ``repeats`` rounds, each timing
    every contender once in turn, so slow spells of the machine fall on all of them. Medians, with each ratio's
    range over the rounds."""
    cfg = model.config
    batch = make_batch(cfg, s["prompts"], seed=1, device=s["device"], grid_side=s["image_px"] // cfg.vision.patch_size)
    rows, T = s["prompts"] * s["group"], s["new_tokens"]

    def ours(c):
        def run():
            r = sample(model, batch, group_size=s["group"], max_new_tokens=T, temperature=1.0, stop_token_ids=(),
                       banned_token_ids=banned_ids(cfg), generator=0, compile=c)
            assert r.completion_ids.shape == (rows, T)
        return run

    def generate():
        out = hf.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          pixel_values=batch.pixel_values, image_grid_thw=batch.image_grid_thw,
                          mm_token_type_ids=(batch.input_ids == cfg.image_token_id).int(), do_sample=True,
                          temperature=1.0, top_k=0, top_p=1.0, num_return_sequences=s["group"], max_new_tokens=T,
                          min_new_tokens=T, suppress_tokens=banned_ids(cfg), eos_token_id=None, pad_token_id=0)
        assert out.shape == (rows, batch.input_ids.shape[1] + T), out.shape

    def timed(fn) -> float:
        sync(s["device"])
        t0 = time.perf_counter()
        fn()
        sync(s["device"])
        return time.perf_counter() - t0

    contenders = {"ours": ours(compile)}
    if compile:
        contenders["ours_eager"] = ours(False)
    contenders["generate"] = generate
    if compile and compile != "graph":
        hf.generation_config.cache_implementation = "static"  # transformers compiles the static-cache step
    res = {"rows": rows, "new_tokens": T, "prompt_len": batch.input_ids.shape[1], "repeats": s["repeats"]}
    times: dict[str, list[float]] = {}
    try:
        for name, fn in contenders.items():  # warm-up (compiles or captures when asked), with its peak memory
            reset_peak(s["device"])
            try:
                res[f"{name}_first_call_s"] = round(timed(fn), 2)
            except Exception as e:  # transformers' compiled generate is the baseline's business; ours still counts
                if name != "generate":
                    raise
                res["generate_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
                continue
            res[f"{name}_peak_gib"] = peak_gib(s["device"])
            times[name] = []
        for _ in range(s["repeats"]):
            for name in times:
                times[name].append(timed(contenders[name]))
    finally:
        hf.generation_config.cache_implementation = None
    for name, ts in times.items():
        res[f"{name}_s"] = round(statistics.median(ts), 2)
        res[f"{name}_runs_s"] = [round(t, 2) for t in ts]
        res[f"{name}_tok_s"] = round(rows * T / statistics.median(ts), 1)
    for base in ("generate", "ours_eager"):
        if base in times:
            per_round = [b / o for b, o in zip(times[base], times["ours"])]
            key = "ratio" if base == "generate" else "ratio_to_eager"
            res[key] = round(statistics.median(per_round), 2)
            res[f"{key}_range"] = [round(min(per_round), 2), round(max(per_round), 2)]
    return res


def write_checkpoint(s: dict, out: Path) -> Path:
    """A random-init checkpoint folder of the part's model: published config (real vocabulary), a small offline
    tokenizer whose special tokens sit at Qwen's ids, the 448-px preprocessor budget."""
    from emor3.data.taxonomy import get_taxonomy
    from emor3.toy.model import tokenizer_corpus

    folder = out / "init"
    if (folder / "config.json").is_file():
        return folder
    tok = build_tiny_tokenizer(tokenizer_corpus([get_taxonomy("mikels8")]), 1024, folder)
    base = tok.convert_tokens_to_ids("<|endoftext|>")
    over = {"special_token_base": base} if s["model"] != "tiny" else {"vocab_size": len(tok), "special_token_base": base}
    cfg = tiny_config(s["model"], **over)
    model = random_model(cfg, getattr(torch, s["dtype"]), s["device"])
    save_pretrained(model, folder)
    del model
    write_preprocessor_config(folder, min_pixels=(s["image_px"] // 2) ** 2, max_pixels=s["image_px"] ** 2)
    return folder


def grpo_config(s: dict, folder: Path, out: Path, compile):
    """The EmoSet recipe, with the data, the batch and the lengths cut to a check's size."""
    d = load_toml(RECIPE)
    d["model"].update(path=str(folder), dtype="float32", min_pixels=(s["image_px"] // 2) ** 2,
                      max_pixels=s["image_px"] ** 2, device=s["device"])
    d["data"] = {"train": "", "eval": [], "taxonomy": "", "cache_dir": str(out / "emoscenes"),
                 "emoscenes_train": 4 * s["grpo_prompts"], "emoscenes_test": 4, "emoscenes_ood": 2,
                 "image_size": s["image_px"], "cold_start": 0}
    d["sft"] = {"steps": 0}
    d["grpo"].update(steps=s["grpo_steps"], prompts_per_step=s["grpo_prompts"], mini_batch_prompts=s["grpo_mini"],
                     group_size=s["group"], micro_batch_rows=s["micro_rows"], max_new_tokens=s["new_tokens"],
                     compile="off" if not compile else "on" if compile is True else compile)
    d["eval"].update(max_new_tokens=16, batch_size=8)
    run_dir = out / ("grpo_eager" if not compile else "grpo_graph" if compile == "graph" else "grpo_compiled")
    # overwrite: a rerun replaces the last check
    d["run"] = {"out": str(run_dir), "progress": False, "save_every": 0, "sample_every": 0, "overwrite": True}
    if s["device"] == "cpu":
        d["run"]["mixed_precision"] = "fp32"
    return config_from_dict(d, where=str(RECIPE))


def part_grpo(s: dict, folder: Path, out: Path, compile) -> dict:
    from emor3.grpo.train import train

    cfg = grpo_config(s, folder, out, compile)
    model_cfg = read_config(folder)
    planned = estimate(model_cfg, plan_from_config(cfg.resolved(), model_cfg, 1))
    reset_peak(s["device"])
    t0 = time.perf_counter()
    try:
        train(cfg)
    finally:  # a 3B checkpoint with its optimizer state is ~45 GB: two of them would fill a 64 GB disk
        for ckpt in Path(cfg.run.out).glob("*checkpoint-*"):
            shutil.rmtree(ckpt, ignore_errors=True)
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (Path(cfg.run.out) / "metrics.jsonl").read_text().splitlines()]
    steps = rows[1:] or rows  # the first step pays one-off costs (allocation, compilation)
    mean = lambda k: round(sum(r[k] for r in steps) / len(steps), 3)  # noqa: E731
    return {"steps": len(rows), "wall_s": round(wall, 1), "step_s": mean("time/step"),
            "first_step_s": round(rows[0]["time/step"], 2), "tokens_per_s": mean("tokens_per_s"),
            "rollout_s": mean("time/rollout"), "judge_s": mean("time/judge"), "update_s": mean("time/update"),
            "peak_memory_gib": round(max(r["peak_memory_mb"] for r in rows) / 1024, 2),
            "skipped_updates": sum(r["skipped_updates"] for r in rows),
            "planned_rollout_gib": round(planned.rollout_peak / GiB, 2),
            "planned_update_gib": round(planned.update_peak / GiB, 2),
            "memory_plan": run_table(cfg.resolved(), model_cfg, 1),
            "loss_finite": all(r["loss"] == r["loss"] for r in rows)}


# --------------------------------------------------------------------------------------------- driver


def run_part(results: dict, name: str, fn, *args) -> None:
    t0 = time.perf_counter()
    try:
        results[name] = fn(*args)
    except Exception as e:
        results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
    results[name]["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"[gpu_check] {name}: {json.dumps({k: v for k, v in results[name].items() if k not in ('traceback', 'memory_plan')})}",
          flush=True)


def summary_markdown(res: dict) -> str:
    lines = [f"# GPU check ({res['mode']})", "", f"{res['device_name']}, torch {res['torch']}, "
             f"{res['model']} ({res['params_B']}B parameters), {res['date']}", ""]
    lines += ["| part | variant | result |", "|---|---|---|"]
    for key, r in res["parts"].items():
        part, variant = key.split(":")
        if "error" in r:
            text = "ERROR " + r["error"][:200]
        elif part == "parity":
            text = (f"logits rel err {r['logits_rel_err']:.2e}, log-prob err {r['logprob_abs_err']:.2e}"
                    + (f"; against float32: ours {r['ours_vs_fp32'][0]:.2e} / {r['ours_vs_fp32'][1]:.2e}, "
                       f"transformers' bf16 {r['transformers_vs_fp32'][0]:.2e} / {r['transformers_vs_fp32'][1]:.2e}"
                       if "ours_vs_fp32" in r else "") + f" ({'ok' if r['ok'] else 'OVER'})")
        elif part == "sampler":
            text = (f"{r['rows']} rows x {r['new_tokens']} tokens, medians of {r.get('repeats', 1)}: sample "
                    f"{r['ours_tok_s']} tok/s ({r['ours_s']} s)"
                    + (f", eager sample {r['ours_eager_s']} s (ratio {r['ratio_to_eager']}x, range "
                       f"{r['ratio_to_eager_range']})" if "ratio_to_eager" in r else "")
                    + (f", generate {r['generate_tok_s']} tok/s ({r['generate_s']} s), ratio {r['ratio']}x"
                       + (f" (range {r['ratio_range']})" if "ratio_range" in r else "") if "ratio" in r else
                       f", generate failed: {r.get('generate_error', '')[:120]}"))
        else:
            text = (f"{r['steps']} steps: {r['step_s']} s/step (first {r['first_step_s']} s), {r['tokens_per_s']} "
                    f"tok/s, peak {r['peak_memory_gib']} GiB (planned {max(r['planned_rollout_gib'], r['planned_update_gib'])}"
                    f" GiB), skipped {r['skipped_updates']}")
        lines.append(f"| {part} | {variant} | {text} (part {r['seconds']} s) |")
    plans = [r["memory_plan"] for k, r in res["parts"].items() if k.startswith("grpo:") and "memory_plan" in r]
    if plans:
        lines += ["", "Memory plan of the GRPO part (emor3.memory, as the run printed it):", "", plans[0]]
    return "\n".join(lines) + "\n"


def write_record(out: Path, res: dict, t_start: float) -> None:
    res["total_s"] = round(time.perf_counter() - t_start, 1)
    (out / "gpu_check.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "gpu_check.md").write_text(summary_markdown(res))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu-smoke", action="store_true", help="the tiny model on the CPU, tiny sizes")
    ap.add_argument("--out", default=str(REPO / "runs" / "gpu_check"), help="folder for gpu_check.json / .md")
    ap.add_argument("--parts", default="",
                    help="comma-separated parts (parity, sampler, grpo) run in every --variants variant; PART:VARIANT "
                         "runs that part in that variant only. Default on a GPU: " + GPU_DEFAULT_PARTS + "; on the "
                         "CPU every part in eager and compiled")
    ap.add_argument("--no-compile", action="store_true", help="the eager variant only")
    ap.add_argument("--variants", default="", help="comma-separated, run in this order: eager, graph (the "
                                                   "sampler's CUDA-graph decode step), compiled (torch.compile); "
                                                   "default eager and compiled, or none with PART:VARIANT parts")
    args = ap.parse_args(argv)
    mode = "cpu-smoke" if args.cpu_smoke else "gpu"
    s = SIZES[mode]
    if s["device"] == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device (use --cpu-smoke on a CPU)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    parts = (args.parts or (GPU_DEFAULT_PARTS if s["device"] == "cuda" else "parity,sampler,grpo")).split(",")
    known = {"eager": False, "graph": "graph", "compiled": s["compile"]}
    plain = [v for v in args.variants.split(",") if v] if args.variants else ["eager"] if args.no_compile else \
        [] if all(":" in p for p in parts) else ["eager", "compiled"]
    named = {p.split(":")[1] for p in parts if ":" in p}  # parts given with their variant, e.g. grpo:graph
    if unknown := sorted((set(plain) | named) - set(known)):
        raise SystemExit(f"gpu_check: unknown variants {unknown}; choose from {sorted(known)}")
    names = [v for v in known if v in set(plain) | named]  # eager, graph, compiled: in that order
    t_start = time.perf_counter()
    dtype = getattr(torch, s["dtype"])
    torch.manual_seed(0)
    res = {"mode": mode, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
           "python": platform.python_version(), "model": s["model"], "sizes": s,
           "device_name": torch.cuda.get_device_name() if s["device"] == "cuda" else platform.processor() or "cpu",
           "params_B": round(param_counts(tiny_config(s["model"])).total / 1e9, 3), "parts": {}}
    # eager first, each variant's parts in turn, the record rewritten after every part: a check stopped by its
    # time limit still leaves what it measured
    for name in names:
        c = known[name]
        wanted = {p for p in ("parity", "sampler", "grpo") if p in parts and name in plain or f"{p}:{name}" in parts}
        wanted.discard("parity" if c == "graph" else "")  # a graph replays the eager forward: eager's parity
        if wanted & {"parity", "sampler"}:
            model = random_model(tiny_config(s["model"]), dtype, s["device"])
            hf = transformers_twin(model)
            if "parity" in wanted:
                run_part(res["parts"], f"parity:{name}", part_parity, s, model, hf, c)
                write_record(out, res, t_start)
            if "sampler" in wanted:
                run_part(res["parts"], f"sampler:{name}", part_sampler, s, model, hf, c)
                write_record(out, res, t_start)
            del model, hf
            reset_peak(s["device"])  # the GRPO part's peak is its own
        if "grpo" in wanted:
            run_part(res["parts"], f"grpo:{name}", part_grpo, s, write_checkpoint(s, out), out, c)
            write_record(out, res, t_start)
    write_record(out, res, t_start)
    print(f"[gpu_check] wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} in {res['total_s']} s")
    return res


if __name__ == "__main__":
    main()
