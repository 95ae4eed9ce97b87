"""python -m emor3.sft: Cold-Start SFT alone (EMO-R3's Cold-Start-Emo; ``emor3.stages.cold_start``), into RUN_DIR/sft.

``python -m emor3.sft traces`` makes SET responses for real data by rejection sampling from a teacher checkpoint
(``emor3.traces``); ``python -m emor3.sft instruct`` runs only the tiny model's instruct stage
(``emor3.toy.instruct``). Every flag: ``--help``.
"""

from __future__ import annotations

import sys

from emor3.config import parse_args, save_config
from emor3.folders import run_cli, wants_debug
from emor3.run_folder import prepare_run_dir
from emor3.stages.build import build, eval_requests
from emor3.stages.cold_start import cold_start
from emor3.toy import instruct
from emor3.toy.world import WORLD
from emor3.traces import traces_main


def sft_main(argv: list[str]) -> None:
    cfg = parse_args(argv, "python -m emor3.sft", (__doc__ or "").strip(), default_out="runs/sft")
    eval_requests(cfg.data.eval, cfg.data.train, WORLD)  # refused settings are refused before a file is touched
    out = prepare_run_dir(cfg, "python -m emor3.sft")  # refuses a folder holding a run; locks it
    save_config(cfg, out / "config.toml")
    run = build(cfg, out, WORLD)
    if instruct.applies(cfg):  # the tiny model starts from its instruct stage, as in a training run
        run = instruct.instruct_stage(cfg, run, out)
    cold_start(cfg, run, out)
    print(f"[emor3] Cold-Start SFT checkpoint: {out / 'sft'}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = {"traces": traces_main, "instruct": instruct.instruct_main}.get(argv[0] if argv else "")
    if command is not None:
        run_cli(command, argv[1:], debug=wants_debug(argv))
        return
    run_cli(sft_main, argv, debug=wants_debug(argv))


if __name__ == "__main__":
    main()
