"""One process-wide switch for progress bars, as `huggingface_hub.utils.disable_progress_bars` is for the Hub's and
`datasets.disable_progress_bars` for datasets': library functions draw their bars with `progress_bar` and take no
`progress=` argument; a command's `--no_progress` (or a program embedding MM-LLaMA) turns them all off at once.

`MM_LLAMA_DISABLE_PROGRESS_BARS=1` (like `HF_HUB_DISABLE_PROGRESS_BARS`) is the default when nothing set the switch.
Turning the switch also turns the bars of huggingface_hub, transformers and datasets, where those are loaded:
huggingface_hub is imported for it (milliseconds, no torch); transformers and datasets only when already imported
(transformers reads huggingface_hub's setting when it is imported later; `mm_llama.data.build` turns the switch again
around its saving, to reach datasets). Standard library and tqdm only: the commands' argument parsing may import this.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Iterable, Iterator

from tqdm.auto import tqdm

ENV_VAR = "MM_LLAMA_DISABLE_PROGRESS_BARS"
_TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's spelling of a true environment flag

# None: not set by anyone; the environment variable decides.
_enabled: bool | None = None


def _environment_default() -> bool:
    return os.environ.get(ENV_VAR, "").strip().upper() not in _TRUE


def progress_bars_enabled() -> bool:
    """Whether `progress_bar` draws: the last `set_progress_bars`, else not `MM_LLAMA_DISABLE_PROGRESS_BARS`."""
    return _environment_default() if _enabled is None else _enabled


def progress_bar(iterable: Iterable | None = None, **tqdm_kwargs: Any) -> tqdm:
    """A `tqdm.auto.tqdm` over `iterable` with `tqdm_kwargs` (desc, total, unit, ...), disabled (it iterates and
    counts but draws nothing) while the switch is off. A `disable=True` of the caller's also holds."""
    disable = bool(tqdm_kwargs.pop("disable", False)) or not progress_bars_enabled()
    return tqdm(iterable, disable=disable, **tqdm_kwargs)


def set_progress_bars(enabled: bool | None) -> None:
    """Turns every progress bar on (True) or off (False): MM-LLaMA's and, where loaded, huggingface_hub's,
    transformers' and datasets'. None returns MM-LLaMA's to the default of `MM_LLAMA_DISABLE_PROGRESS_BARS` (and the
    libraries' to match it)."""
    global _enabled
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"set_progress_bars takes True, False or None, got {enabled!r}")
    _enabled = enabled
    on = progress_bars_enabled()
    _set_library_bars(on, on if "transformers" in sys.modules else None, on if "datasets" in sys.modules else None)


@contextlib.contextmanager
def progress_bars(enabled: bool) -> Iterator[None]:
    """`set_progress_bars(enabled)` inside the block; afterwards the switch and each library's own setting are what
    they were (a command run in-process, by a test or the demo, leaves its caller's settings alone)."""
    global _enabled
    saved = _enabled, *_library_bars()
    set_progress_bars(enabled)
    try:
        yield
    finally:
        _enabled = saved[0]
        hub_on, transformers_on, datasets_on = saved[1:]
        if transformers_on is None and "transformers" in sys.modules:
            transformers_on = hub_on  # imported inside the block, it copied the block's setting of huggingface_hub's
        _set_library_bars(hub_on, transformers_on, datasets_on)


def _library_bars() -> tuple[bool, bool | None, bool | None]:
    """(huggingface_hub's, transformers', datasets') bars enabled; None for a library not imported."""
    import huggingface_hub.utils as hub

    transformers = sys.modules.get("transformers.utils.logging") if "transformers" in sys.modules else None
    datasets = sys.modules.get("datasets")
    return (not hub.are_progress_bars_disabled(),
            transformers.is_progress_bar_enabled() if transformers is not None else None,
            datasets.is_progress_bar_enabled() if datasets is not None else None)


def _set_library_bars(hub_on: bool, transformers_on: bool | None, datasets_on: bool | None) -> None:
    import huggingface_hub.utils as hub

    if transformers_on is not None:
        from transformers.utils import logging as transformers_logging

        # Also sets huggingface_hub's, which is set on its own below.
        (transformers_logging.enable_progress_bar if transformers_on else transformers_logging.disable_progress_bar)()
    if datasets_on is not None:
        import datasets

        if datasets.is_progress_bar_enabled() != datasets_on:  # datasets warns when its env var overrides a call
            (datasets.enable_progress_bars if datasets_on else datasets.disable_progress_bars)()
    if hub.are_progress_bars_disabled() == hub_on:
        (hub.enable_progress_bars if hub_on else hub.disable_progress_bars)()


__all__ = ["ENV_VAR", "progress_bar", "progress_bars", "progress_bars_enabled", "set_progress_bars"]
