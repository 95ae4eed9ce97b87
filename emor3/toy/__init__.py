"""The CPU world of the default run: the tiny model and its tokenizer (``model``), the synthetic EmoScenes benchmark
(``emoscenes``), the instruct stage that stands in for an instruct checkpoint (``instruct``), and the build hook the
default run selects (``world.WORLD``). The general stages know nothing of it beyond that hook."""
