"""The MM-LLaMA model, laid out as a transformers model folder: `configuration_mm_llama` (MMLlamaConfig),
`modeling_mm_llama` (MMLlamaForCausalLM and its projector), `loss_mm_llama` (the one loss / answer-token metric),
`processing_mm_llama` (the LLaMA-2 chat template with media markers) and `tokenization_mm_llama` (sentencepiece-exact
LLaMA tokenizer). The files import only each other and transformers, so `save_pretrained` can ship them as remote
code; `import mm_llama` registers them with the Auto classes."""
