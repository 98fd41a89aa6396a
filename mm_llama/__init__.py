"""MM-LLaMA: LLaMA-2-chat with ImageBind image and video input.

Importing the package registers its config, model, tokenizer and processor with the transformers Auto classes (and
the "mm-llama-chat" pipeline task), so `AutoModelForCausalLM.from_pretrained(folder)` and
`AutoProcessor.from_pretrained(folder)` load MM-LLaMA checkpoints in every process that imported `mm_llama`. The
public names below are imported on first use.

The registration is unconditional but happens when transformers is there to register with: at once if transformers
is already imported, otherwise right after its import (no Auto class can be reached before that). So `mm-llama
<command> --help`, which imports neither torch nor transformers, still answers at once.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from typing import Any

from ._lazy import lazy_getattr

__version__ = "0.2.0"

# Public name -> the module that defines it (imported lazily, PEP 562).
_PUBLIC_NAMES = {
    "MMLlamaConfig": "model.configuration_mm_llama",
    "MMLlamaForCausalLM": "model.modeling_mm_llama",
    "MMLlamaProjector": "model.modeling_mm_llama",
    "MMLlamaCausalLMOutput": "model.modeling_mm_llama",
    "MMLlamaProcessor": "model.processing_mm_llama",
    "MMLlamaTokenizer": "model.tokenization_mm_llama",
    "MMLlamaChatPipeline": "frontends.pipeline",
    "register_pipeline": "frontends.pipeline",
}
_registered = False


def register_auto_classes() -> None:
    """Registers MM-LLaMA (and ImageBind) with the transformers Auto classes and the "mm-llama-chat" pipeline task.
    Idempotent; `import mm_llama` runs it (see the module docstring)."""
    global _registered
    if _registered:
        return
    _registered = True
    from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor, AutoTokenizer

    from . import imagebind  # noqa: F401  (registers the ImageBind config, model and image processor)
    from .model.configuration_mm_llama import MMLlamaConfig
    from .model.modeling_mm_llama import MMLlamaForCausalLM
    from .frontends.pipeline import register_pipeline
    from .model.processing_mm_llama import MMLlamaProcessor
    from .model.tokenization_mm_llama import MMLlamaTokenizer

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


class _RegisterWhenTransformersArrives(importlib.abc.MetaPathFinder):
    """Runs `register_auto_classes()` as soon as transformers is imported, or, when the import came from inside an
    mm_llama module, as soon as the outermost mm_llama module being imported is complete (registering imports
    mm_llama modules, which must not be half-initialised then). Watches only `transformers` and `mm_llama.*`
    imports, finds them with the other finders, and leaves `sys.meta_path` once the registration is done."""

    def __init__(self) -> None:
        self.running = 0  # mm_llama modules whose code is executing now (nested imports)
        self.transformers_imported = False

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if _registered:
            if self in sys.meta_path:
                sys.meta_path.remove(self)
            return None
        if fullname != "transformers" and not fullname.startswith(f"{__name__}."):
            return None
        for finder in sys.meta_path:
            # Skips every hook of this kind, including one left by an earlier import of a re-imported mm_llama.
            if type(finder).__name__ != type(self).__name__ and hasattr(finder, "find_spec"):
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            # Each spec gets its own loader object: wrapping its exec_module changes no other module's import.
            spec.loader.exec_module = self._wrap(spec.loader.exec_module, is_ours=fullname != "transformers")
        return spec

    def _wrap(self, exec_module: Any, is_ours: bool) -> Any:
        def exec_then_register(module: Any) -> None:
            self.running += is_ours
            try:
                exec_module(module)
            finally:
                self.running -= is_ours
            self.transformers_imported |= not is_ours
            if self.transformers_imported and self.running == 0:
                register_auto_classes()

        return exec_then_register


# One hook at a time: a re-imported mm_llama (tests drop it from sys.modules) replaces the hook of the earlier one.
sys.meta_path[:] = [finder for finder in sys.meta_path
                    if type(finder).__name__ != _RegisterWhenTransformersArrives.__name__]
if "transformers" in sys.modules:
    register_auto_classes()
else:
    sys.meta_path.insert(0, _RegisterWhenTransformersArrives())

__all__ = [*_PUBLIC_NAMES, "register_auto_classes", "__version__"]
