"""The default run's world (``WORLD``): what ``emor3.stages.build`` builds where no ``--data.train`` or
``--model.path`` is given: EmoScenes generated from the run's seed (train; the final table's test in-domain and
compositional, ood_render, ood_unseen out-of-domain, or with ``--data.emoscenes-eval validation`` the validation
split alone; ood_emotion6 and ood_binary are drawn but not evaluated: ``emor3.toy.emoscenes`` says why; cold-start
traces), and the tiny model built offline into ``RUN_DIR/init`` with a tokenizer trained on the EmoScenes corpus and
the prompts the run will use (``RUN_DIR/instruct`` once the instruct stage has made it)."""

from __future__ import annotations

import functools
from pathlib import Path

from emor3.config import Config
from emor3.folders import UsageError
from emor3.stages.build import EvalSet, World
from emor3.toy.emoscenes import SPLITS, eval_split_names, load_emoscenes
from emor3.toy.emoscenes_clips import eval_split_names as clip_eval_split_names
from emor3.toy.emoscenes_clips import load_emoscenes_clips, split_domain as clip_split_domain
from emor3.toy.model import build_tiny_checkpoint, tokenizer_corpus


def emoscenes_data(cfg: Config, asked: list[str] | None):
    """(train, cold-start traces, the eval sets ``asked`` by name or, when None, ``--data.emoscenes-eval``'s)."""
    d = cfg.data
    clips = d.emoscenes_variant == "clips"  # the clip benchmark (emor3.toy.emoscenes_clips)
    load = load_emoscenes_clips if clips else functools.partial(load_emoscenes, variant=d.emoscenes_variant)
    splits = load(d.cache_dir, seed=cfg.run.seed, n_train=d.emoscenes_train, n_test=d.emoscenes_test,
                  n_ood=d.emoscenes_ood, image_size=d.image_size, label_noise=d.label_noise,
                  n_coldstart=d.cold_start, on_bad_sample=d.on_bad_sample)
    names = asked if asked is not None else (clip_eval_split_names(d.emoscenes_eval) if clips else
                                             eval_split_names(d.emoscenes_eval, d.emoscenes_variant))
    missing = [n for n in names if n not in splits]
    if asked and missing:
        raise UsageError(f"--data.eval {','.join(missing)}: not built in this run (a size of 0, or a split of "
                         "another --data.emoscenes-variant)")
    evals = [EvalSet(name, splits[name], clip_split_domain(name) if clips else SPLITS[name].domain)
             for name in SPLITS if name in names and name in splits]
    return splits["train"], splits.get("coldstart"), evals


def tiny_model(cfg: Config, out: Path, taxonomies, questions=()) -> Path:
    """The folder the run's tiny model loads from: ``RUN_DIR/instruct`` once the instruct stage has run (a resumed
    run), else ``RUN_DIR/init``, written here on first use."""
    if (out / "instruct" / "config.json").is_file():
        return out / "instruct"
    init = out / "init"
    if not (init / "config.json").is_file():
        m = cfg.model
        build_tiny_checkpoint(init, tokenizer_corpus(taxonomies, questions), name=m.tiny, seed=cfg.run.seed,
                              vocab_size=m.tokenizer_vocab, image_pixels=m.max_pixels)
    return init


WORLD = World(
    name="EmoScenes",
    splits=tuple(n for n, sp in SPLITS.items() if n != "train" and (sp.in_table or sp.selection)),
    reserved=tuple(SPLITS) + ("coldstart",),
    data=emoscenes_data,
    model=tiny_model,
)
