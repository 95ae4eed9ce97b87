"""python -m emor3.grpo.train: the whole EMO-R3 run. Cold-Start SFT, GRPO with SET and RER, evaluation.

With no arguments it runs the embedded default on a CPU in minutes: a tiny Qwen2.5-VL-architecture model with a
tokenizer trained offline, the synthetic EmoScenes benchmark, Cold-Start SFT on ~100 SET traces, GRPO with the
``emo_r3`` preset, then the paper-style accuracy table. ``--model PATH`` starts from a Qwen2-VL / Qwen2.5-VL /
Qwen3-VL checkpoint folder instead, ``--data`` / ``--eval-data`` take datasets in the loaders' formats,
``--config FILE`` a TOML recipe (examples/). Every flag: ``--help``.

The method, and how one step departs from textbook GRPO, is docs/method.md's ("One GRPO step"). This file calls the
stages in order: ``build`` (``emor3.stages.build``; the default run's world is ``emor3.toy``), ``resume`` or the
instruct stage (``emor3.toy.instruct``) and Cold-Start SFT (``emor3.stages.cold_start``), the baseline evaluation
(``emor3.evaluate``), GRPO (``emor3.stages.grpo``), the final evaluation.
"""

from __future__ import annotations

import os

from emor3 import distributed as dist
from emor3.config import Config, parse_args, save_config, validate_config
from emor3.evaluate import evaluate_baseline, evaluate_run
from emor3.folders import run_cli, unlock_folder, wants_debug
from emor3.memory import fits_verdict, run_table
from emor3.run_folder import prepare_run_dir
from emor3.stages.build import build, eval_requests, set_threads
from emor3.stages.cold_start import cold_start
from emor3.stages.grpo import check_world, grpo, model_config, resolve_sample_chunk
from emor3.stages.resume import resume
from emor3.toy import instruct
from emor3.toy.world import WORLD

DESCRIPTION = (__doc__ or "").split("\n\n")[0] + "\n\n" + (__doc__ or "").split("\n\n")[1]


def dry_run(cfg: Config) -> dict:
    """The memory plan from the config alone: no weights, data, run folder or process group."""
    world = cfg.run.dry_run_world or int(os.environ.get("WORLD_SIZE", 1))
    print(run_table(cfg, model_config(cfg), world))
    fits, verdict = fits_verdict(cfg, model_config(cfg), world)
    print(verdict)
    return {"dry_run": True, "fits": fits}


def train(cfg: Config) -> dict:
    """The whole run: build -> resume, or instruct stage and Cold-Start SFT -> baseline evaluation -> GRPO steps ->
    evaluation of the trained policy; returns the evaluation table's rows."""
    cfg = validate_config(cfg).resolved()
    if cfg.run.dry_run:
        return dry_run(cfg)
    eval_requests(cfg.data.eval, cfg.data.train, WORLD)  # refused settings are refused before a file is touched
    out = prepare_run_dir(cfg, "python -m emor3.grpo.train", can_resume=True)
    try:
        return _train(cfg, out)
    finally:
        unlock_folder(out)  # the process may go on (a test, an ablation): the folder is free once the run ends


def _train(cfg: Config, out) -> dict:
    """``train`` once the run folder is prepared and locked."""
    resuming = bool(cfg.run.resume)
    # what a result depends on besides the config: same seed and thread count on the same machine repeat exactly
    dist.print0(f"[emor3] seed {cfg.run.seed}, torch threads {set_threads(cfg)}, device {cfg.model.device}")
    launched = dist.init(cfg.run.dist_timeout, cfg.run.dist_setup_timeout, cfg.model.device)  # torchrun: join the group
    check_world(cfg, dist.world_size())
    cfg = resolve_sample_chunk(cfg, dist.world_size())  # the one config every stage reads from here on

    # ---- setup: rank 0 first (it writes the shared files: data cache, tiny model, SFT checkpoint, baseline) ----
    with dist.rank0_first("setup (data, model, Cold-Start SFT, baseline evaluation)"):
        run = build(cfg, out, WORLD)  # the start model, processor, data, reward setup
        point = resume(cfg, out, run.source_dir, run.device) if resuming else None
        if dist.is_main() and not resuming:  # the data is sound: the settings go on disk before any training
            save_config(cfg, out / "config.toml")
        if point is None and instruct.applies(cfg):  # the tiny model's stand-in for an instruct checkpoint
            run = instruct.instruct_stage(cfg, run, out)
        model = point.model if point is not None else cold_start(cfg, run, out)  # Cold-Start SFT into RUN_DIR/sft
        baseline = evaluate_baseline(cfg, run, model, out, resumed=resuming) if dist.is_main() else None

    result = grpo(cfg, run, model, out, point, launched)
    if result.stopped_at is not None:
        return {"stopped_at": result.stopped_at}
    if result.model is None:  # torchrun: rank 0 alone evaluates
        return {}
    return evaluate_run(cfg, run, result.model, out, baseline)  # the paper-style table


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv, "python -m emor3.grpo.train", DESCRIPTION)
    with dist.guard("the GRPO run"):  # a failed collective (a crashed rank) ends with an error that says so
        run_cli(train, cfg, debug=wants_debug(argv))


if __name__ == "__main__":
    main()
