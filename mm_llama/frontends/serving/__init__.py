"""`mm-llama serve`: an OpenAI-compatible HTTP API (Chat Completions, streamed or not) over one loaded model.

  - `command`: the `mm-llama serve` arguments (argparse only, so `--help` answers at once) and `run`;
  - `schema`: the pydantic request/response models (OpenAI's Chat Completions shapes);
  - `media`: `data:` URLs and allow-listed local files -> content parts the library embeds;
  - `engine`: the batching engine (concurrent requests decoded together, left-padded, one thread);
  - `app`: the FastAPI app (routes, API key, body limit, OpenAI-shaped errors, request log).

See docs/serving.md for the user's side.
"""
