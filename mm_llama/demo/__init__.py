"""The built-in demo (`mm-llama demo`): a synthetic image/video corpus, tiny stand-ins for LLaMA-2-chat and
ImageBind saved in Meta's checkpoint formats, and a pipeline that runs the project's real scripts on them.

- `corpus`: shapes and clips with questions in LLaVA / VideoChat formats, a held-out eval set, pre-training text.
- `tiny_models`: the sentencepiece tokenizer, the tiny LLaMA and the tiny ImageBind, written as Meta ships them.
- `pipeline`: every step in order, with a summary per step and accuracy per question type against chance.
"""

from .corpus import CORPUS_SIZES, QUESTION_TYPES, CorpusSize, generate_corpus
from .pipeline import DEMO_SIZES, DemoConfig, run_demo

__all__ = ["CORPUS_SIZES", "DEMO_SIZES", "QUESTION_TYPES", "CorpusSize", "DemoConfig", "generate_corpus", "run_demo"]
