"""MM-LLaMA: LLaMA-2-chat with ImageBind image and video input.

Importing the package registers its config, model, tokenizer and processor with the transformers Auto classes,
so `AutoModelForCausalLM.from_pretrained(folder)` and `AutoProcessor.from_pretrained(folder)` load MM-LLaMA
checkpoints.
"""

from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor, AutoTokenizer

from . import imagebind  # registers ImageBindVisionConfig / ImageBindVisionModel with the Auto classes
from .configuration_mm_llama import MMLlamaConfig
from .modeling_mm_llama import MMLlamaCausalLMOutput, MMLlamaForCausalLM, MMLlamaProjector
from .pipeline import MMLlamaChatPipeline, register_pipeline
from .processing_mm_llama import MMLlamaProcessor
from .tokenization_mm_llama import MMLlamaTokenizer

__version__ = "0.1.0"


def _register_auto_classes() -> None:
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


_register_auto_classes()
register_pipeline()  # pipeline("mm-llama-chat", model=...) works once mm_llama is imported

__all__ = [
    "MMLlamaConfig",
    "MMLlamaForCausalLM",
    "MMLlamaProjector",
    "MMLlamaCausalLMOutput",
    "MMLlamaProcessor",
    "MMLlamaTokenizer",
    "MMLlamaChatPipeline",
    "register_pipeline",
]
