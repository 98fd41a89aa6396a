"""MM-LLaMA: LLaMA-2-chat with ImageBind image and video input.

Importing the package registers its config, model, tokenizer and processor with the transformers Auto classes (and
the "mm-llama-chat" pipeline task), so `AutoModelForCausalLM.from_pretrained(folder)` and
`AutoProcessor.from_pretrained(folder)` load MM-LLaMA checkpoints. The public names below are imported on first use.

One exception: in a process started as the `mm-llama` command or as one of the repository's `scripts/*.py`, the
registration waits until a command needs it (`mm_llama.cli` calls `register_auto_classes()`), so that `--help` and
argument errors answer at once instead of after the ~5 s import of torch and transformers.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ._lazy import lazy_getattr

__version__ = "0.2.0"

# Public name -> the module that defines it (imported lazily, PEP 562).
_PUBLIC_NAMES = {
    "MMLlamaConfig": "configuration_mm_llama",
    "MMLlamaForCausalLM": "modeling_mm_llama",
    "MMLlamaProjector": "modeling_mm_llama",
    "MMLlamaCausalLMOutput": "modeling_mm_llama",
    "MMLlamaProcessor": "processing_mm_llama",
    "MMLlamaTokenizer": "tokenization_mm_llama",
    "MMLlamaChatPipeline": "pipeline",
    "register_pipeline": "pipeline",
}
_registered = False


def register_auto_classes() -> None:
    """Registers MM-LLaMA (and ImageBind) with the transformers Auto classes and the "mm-llama-chat" pipeline task.
    Idempotent; runs at `import mm_llama` except in command-line processes (see the module docstring)."""
    global _registered
    if _registered:
        return
    _registered = True
    from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor, AutoTokenizer

    from . import imagebind  # noqa: F401  (registers the ImageBind config, model and image processor)
    from .configuration_mm_llama import MMLlamaConfig
    from .modeling_mm_llama import MMLlamaForCausalLM
    from .pipeline import register_pipeline
    from .processing_mm_llama import MMLlamaProcessor
    from .tokenization_mm_llama import MMLlamaTokenizer

    AutoConfig.register(MMLlamaConfig.model_type, MMLlamaConfig, exist_ok=True)
    AutoModelForCausalLM.register(MMLlamaConfig, MMLlamaForCausalLM, exist_ok=True)
    AutoTokenizer.register(MMLlamaConfig, slow_tokenizer_class=MMLlamaTokenizer, exist_ok=True)
    AutoProcessor.register(MMLlamaConfig, MMLlamaProcessor, exist_ok=True)
    # save_pretrained writes `auto_map` and copies the code files, so that checkpoints load with
    # trust_remote_code=True where this package is not installed.
    MMLlamaConfig.register_for_auto_class()
    MMLlamaForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    MMLlamaTokenizer.register_for_auto_class("AutoTokenizer")
    MMLlamaProcessor.register_for_auto_class("AutoProcessor")
    register_pipeline()  # pipeline("mm-llama-chat", model=...)


__getattr__ = lazy_getattr(__name__, _PUBLIC_NAMES, before_import=register_auto_classes)


def _started_as_command_line_tool() -> bool:
    """Whether this process runs the `mm-llama` console script or one of this repository's scripts/*.py."""
    program = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if program is None:
        return False
    if program.name in ("mm-llama", "mm-llama.exe"):
        return True
    return program.suffix == ".py" and program.resolve().parent == Path(__file__).resolve().parents[1] / "scripts"


if not _started_as_command_line_tool():
    register_auto_classes()

__all__ = [*_PUBLIC_NAMES, "register_auto_classes", "__version__"]
