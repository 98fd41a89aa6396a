"""The built-in demo (`mm-llama demo`): a synthetic image/video corpus, tiny stand-ins for LLaMA-2-chat and
ImageBind saved in Meta's checkpoint formats, and a pipeline that runs the project's real scripts on them.

- `scenes`: the synthetic world (coloured shapes, clips that move or change colour), drawn and encoded as files.
- `conversations`: questions, answers and records in LLaVA / VideoChat formats, eval items, pre-training text.
- `corpus`: the corpus sizes and the writer of every file.
- `tiny_llama`, `tiny_imagebind`: the two stand-in models, pre-trained with the HF Trainer (`trainer`) and written
  as Meta ships them (their tokenizer and tiny builders: `mm_llama.testing_utils`).
- `pipeline`: every step in order, with a summary per step and accuracy per question type against chance.
"""

from .conversations import QUESTION_TYPES
from .corpus import CORPUS_SIZES, CorpusSize, generate_corpus
from .pipeline import DEMO_SIZES, DemoConfig, run_demo

__all__ = ["CORPUS_SIZES", "DEMO_SIZES", "QUESTION_TYPES", "CorpusSize", "DemoConfig", "generate_corpus", "run_demo"]
