"""What users talk to once a model is trained: `chat` (the terminal chat and batch files), `web` (the Gradio demo),
`pipeline` (the "mm-llama-chat" transformers pipeline), `serving` (the OpenAI-compatible API server) and `lmms_eval`
(the lmms-eval model). All decode through `mm_llama.generation` and load through `mm_llama.loading`."""
