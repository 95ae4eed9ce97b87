"""References built from transformers' internals, and the releases they were checked against.

Most parity tests use transformers' public API (`from_pretrained`, `model(...)`, `generate`). A few need more:
the Qwen-VL processors without their video processor (which needs torchvision, absent from the test
environment), `get_rope_index`'s argument layout, `smart_resize`'s module. Those calls run inside
`internals(what)`: on a transformers release inside CHECKED an error fails the test as usual; outside it, an
error from transformers skips the test and names the release, so a new release shows up as a named skip
(`make test-latest`) instead of a broken first run. Widen CHECKED when the suite passes on a new release.
"""

import contextlib

import pytest
import transformers

CHECKED = ("5.24.0", "5.25.0")  # the oldest and newest transformers releases this suite has passed on


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("+")[0].split(".")[:3] if p.isdigit())


def checked() -> bool:
    """Whether the installed transformers lies within the releases the internals below were checked on."""
    return _release(CHECKED[0]) <= _release(transformers.__version__) <= _release(CHECKED[1])


@contextlib.contextmanager
def internals(what: str):
    """Run a block that leans on transformers' internals: fail inside CHECKED, skip (naming the release) outside."""
    try:
        yield
    except (AttributeError, TypeError, ValueError, ImportError, KeyError) as err:
        if checked():
            raise
        pytest.skip(f"{what} leans on transformers internals checked on {CHECKED[0]}..{CHECKED[1]}; "
                    f"transformers {transformers.__version__} changed them: {type(err).__name__}: {err}")


def image_only_processor(processor_cls, image_processor, tokenizer):
    """transformers' Qwen-VL processor (`Qwen2VLProcessor`, `Qwen3VLProcessor`) with no video processor.

    The processor's own `__init__` runs in full, so every attribute a release sets is set; only ProcessorMixin's
    class check is told that the absent video processor is allowed."""

    class ImageOnly(processor_cls):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return ImageOnly(image_processor=image_processor, tokenizer=tokenizer, video_processor=None)
