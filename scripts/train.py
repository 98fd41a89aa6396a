#!/usr/bin/env python
"""Train MM-LLaMA: `accelerate launch scripts/train.py recipes/stage1.yaml [--key value ...]`.

The recipe's keys are the fields of mm_llama.training's ModelArguments / DataArguments / LoraArguments and
transformers' TrainingArguments; command-line flags override the recipe (`--learning_rate 1e-4`).
`python scripts/train.py --help` lists them all.
"""

from mm_llama.training import train

if __name__ == "__main__":
    train()
