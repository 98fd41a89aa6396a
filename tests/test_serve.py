"""`mm-llama serve` (mm_llama/frontends/serving): the OpenAI-compatible API, driven by the official `openai` client against a
live server on 127.0.0.1 with a tiny stage-1 model (no vision tower) and a tiny ImageBind (vision + audio) folder.

Answers must equal `mm-llama chat --temperature 0` one-shot (the CLI itself, or its `ChatSession` for media the
one-shot flags cannot express), plain and streamed, alone and inside batches of concurrent requests; every kind of
bad input gets its 4xx in OpenAI's error shape and the next request is still answered; a subprocess run of
`scripts/serve.py` (stdin closed) answers, refuses a busy port, and finishes a running request on SIGINT.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from conftest import need
from test_chat_cli import MAX_NEW_TOKENS
from test_merge import REPO_ROOT, save_stage1

openai = need("openai", 'pip install "mm-llama[dev]"', module_level=True)
need("fastapi", 'pip install "mm-llama[serve]"', module_level=True)
need("av", "pip install av", module_level=True)
import uvicorn
from test_audio import tone, write_mp4_with_sound, write_wav

QUESTION = "What is in the image?"
SYSTEM = "You are a helpful assistant."
API_KEY = "test-key"
CONTEXT = 512  # the tiny model's max_position_embeddings
MAX_BODY = 2 * 2**20
MAX_MEDIA = 256 * 2**10


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def data_url(path: Path, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def png_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(np.random.default_rng(seed).integers(0, 256, (36, 50, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def setup(tmp_path_factory, spm_model_path):
    """Model folders, media files, and the library objects the server is built from."""
    from mm_llama.frontends.chat import ChatSession
    from mm_llama.generation import GenerationSettings, MediaEmbedder
    from mm_llama.imagebind import (
        ImageBindAudioConfig,
        ImageBindAudioModel,
        ImageBindAudioProcessor,
        ImageBindProcessor,
        ImageBindVisionConfig,
        ImageBindVisionModel,
    )
    from mm_llama.loading import load_model

    root = tmp_path_factory.mktemp("serve")
    stage1 = save_stage1(root / "stage1", spm_model_path)
    imagebind = root / "imagebind"  # the layout `mm-llama convert-imagebind --modality all` writes
    torch.manual_seed(0)
    # Weights 10x the default init, so that different images get different embeddings (and answers).
    vision = ImageBindVisionConfig.from_preset("tiny", image_size=32, initializer_range=0.2)
    ImageBindVisionModel(vision).save_pretrained(imagebind / "vision")
    ImageBindProcessor(image_size=32).save_pretrained(imagebind / "vision")
    ImageBindAudioModel(ImageBindAudioConfig.from_preset("tiny")).save_pretrained(imagebind / "audio")
    ImageBindAudioProcessor().save_pretrained(imagebind / "audio")
    allowed, outside = root / "allowed", root / "outside"
    allowed.mkdir(), outside.mkdir()
    media = {"image": allowed / "photo.png", "image2": outside / "other.png",
             "video": write_mp4_with_sound(allowed / "clip.mp4", tone(2.5, 220)),
             "audio": write_wav(allowed / "bird.wav", tone(3.0, 880))}
    media["image"].write_bytes(png_bytes(0))
    media["image2"].write_bytes(png_bytes(1))
    (allowed / "escape.png").symlink_to(media["image2"])  # a link out of the allowed folder
    model, processor = load_model(str(stage1), device="cpu")
    embedder = MediaEmbedder.for_model(model, processor, imagebind=imagebind, device="cpu", cache_size=64)
    greedy = GenerationSettings(MAX_NEW_TOKENS, 0.0, 0.9)

    def session_answers(turns: list[tuple[str, str | None, Path | None]], system: str | None = None) -> list[str]:
        """What `mm-llama chat`'s session answers to these (text, media type, path) turns, greedily."""
        session = ChatSession(model, processor, embedder, greedy, system=system)
        answers = []
        for text, media_type, path in turns:
            if media_type:
                session.attach(media_type, path)
            answers.append(session.respond(text))
        return answers

    return dict(root=root, stage1=stage1, imagebind=imagebind, allowed=allowed, media=media, model=model,
                processor=processor, embedder=embedder, greedy=greedy, session_answers=session_answers)


@pytest.fixture(scope="module")
def server(setup):
    """The app in-process (uvicorn in a thread) on a free port: greedy by default, API key on, small limits."""
    from mm_llama.frontends.serving.app import ServerConfig, create_app
    from mm_llama.frontends.serving.engine import BatchingEngine
    from mm_llama.frontends.serving.media import MediaResolver

    engine = BatchingEngine(setup["model"], setup["processor"], setup["embedder"], max_batch_size=16,
                            batch_window=0.02, max_queue=64)
    resolver = MediaResolver(setup["embedder"], [setup["allowed"]], max_media_bytes=MAX_MEDIA)
    config = ServerConfig("tiny", CONTEXT, setup["greedy"], api_key=API_KEY, max_body_bytes=MAX_BODY)
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(create_app(engine, resolver, config), host="127.0.0.1", port=port,
                                       log_level="warning", access_log=False))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.02)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, max_retries=0, timeout=60)
    yield dict(client=client, port=port, engine=engine, base=f"http://127.0.0.1:{port}")
    uv.should_exit = True
    thread.join(30)
    assert not resolver.scratch.exists(), "the scratch folder is removed on shutdown"


def ask(client, messages, **kwargs):
    return client.chat.completions.create(model="tiny", messages=messages, **kwargs)


def ask_streamed(client, messages, **kwargs) -> tuple[str, str, list]:
    """(joined content, finish_reason, chunks) of a streamed answer."""
    chunks = list(ask(client, messages, stream=True, **kwargs))
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    finish = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    return text, finish[0], chunks


def wait_until_decoding(stream) -> None:
    """Reads a streamed answer up to its first piece of text: its row is then in a running batch."""
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            return
    raise AssertionError("the stream ended before any text")


def user(text: str, *parts: dict) -> dict:
    return {"role": "user", "content": [{"type": "text", "text": text}, *parts]}


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


# ---------------------------------------------------------------------------------------------------- answers


def test_plain_and_streamed_answers_equal_the_chat_cli(setup, server, capsys):
    from mm_llama.cli import main as cli

    client, image = server["client"], setup["media"]["image"]
    common = [str(setup["stage1"]), "--device", "cpu", "--temperature", "0", "--max_new_tokens", str(MAX_NEW_TOKENS),
              "--imagebind", str(setup["imagebind"]), "--no_stream"]
    assert cli(["chat", *common, "--prompt", "Hello there", "--system", SYSTEM]) == 0
    text_answer = capsys.readouterr().out.rstrip("\n")
    assert cli(["chat", *common, "--prompt", QUESTION, "--image", str(image)]) == 0
    image_answer = capsys.readouterr().out.rstrip("\n")
    assert text_answer and image_answer and text_answer != image_answer

    text_messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello there"}]
    image_messages = [user(QUESTION, image_part(data_url(image, "image/png")))]
    for messages, expected in ((text_messages, text_answer), (image_messages, image_answer)):
        plain = ask(client, messages, temperature=0, max_tokens=MAX_NEW_TOKENS)
        assert plain.choices[0].message.content == expected
        assert plain.choices[0].message.role == "assistant" and plain.object == "chat.completion"
        streamed, finish, chunks = ask_streamed(client, messages, temperature=0, max_completion_tokens=MAX_NEW_TOKENS,
                                                stream_options={"include_usage": True})
        assert streamed == expected and finish == plain.choices[0].finish_reason
        assert chunks[0].choices[0].delta.role == "assistant" and len({chunk.id for chunk in chunks}) == 1
        assert chunks[-1].choices == [] and chunks[-1].usage == plain.usage  # the include_usage chunk
    # usage: the prompt's tokens as the processor renders them, and the answer's tokens (<= max_tokens).
    inputs = setup["processor"]([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello there"}],
                                add_generation_prompt=True)
    answer = ask(client, text_messages, max_tokens=MAX_NEW_TOKENS)  # the server's default is greedy here
    usage = answer.usage
    assert usage.prompt_tokens == inputs["input_ids"].shape[1]
    if answer.choices[0].finish_reason == "length":
        assert usage.completion_tokens == MAX_NEW_TOKENS
    else:  # the answer's tokens and the EOS
        assert 1 <= usage.completion_tokens < MAX_NEW_TOKENS
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert [model.id for model in client.models.list()] == ["tiny"]


def test_video_audio_and_a_two_turn_conversation(setup, server):
    client, media = server["client"], setup["media"]
    video_answer, = setup["session_answers"]([("Describe the clip.", "video", media["video"])])
    video = ask(client, [user("Describe the clip.", {"type": "video_url",
                                                     "video_url": {"url": data_url(media["video"], "video/mp4")}})])
    assert video.choices[0].message.content == video_answer

    audio_answer, = setup["session_answers"]([("What do you hear?", "audio", media["audio"])])
    audio_part = {"type": "input_audio",
                  "input_audio": {"data": base64.b64encode(media["audio"].read_bytes()).decode(), "format": "wav"}}
    assert ask(client, [user("What do you hear?", audio_part)]).choices[0].message.content == audio_answer

    first, second = setup["session_answers"]([(QUESTION, "image", media["image"]), ("And its colour?", None, None)],
                                             system=SYSTEM)
    messages = [{"role": "developer", "content": SYSTEM}, user(QUESTION, image_part(data_url(media["image"],
                                                                                            "image/png")))]
    assert ask(client, messages).choices[0].message.content == first
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "And its colour?"}]
    assert ask(client, messages).choices[0].message.content == second
    assert ask_streamed(client, messages)[0] == second


def test_local_files_only_from_the_allowed_folder(setup, server):
    client, media = server["client"], setup["media"]
    from_data = ask(client, [user(QUESTION, image_part(data_url(media["image"], "image/png")))])
    for url in (f"file://{media['image']}", str(media["image"])):
        assert ask(client, [user(QUESTION, image_part(url))]).choices[0].message.content == \
            from_data.choices[0].message.content
    for url in (str(media["image2"]), str(setup["allowed"] / "escape.png"), f"{setup['allowed']}/../outside/other.png"):
        with pytest.raises(openai.PermissionDeniedError, match="outside the folders this server may read"):
            ask(client, [user(QUESTION, image_part(url))])


def test_stop_strings_and_seeded_sampling(setup, server):
    client = server["client"]
    messages = [{"role": "user", "content": "Hello there"}]
    full = ask(client, messages, max_tokens=MAX_NEW_TOKENS).choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 2]
    cut = ask(client, messages, max_tokens=MAX_NEW_TOKENS, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].message.content == full[:full.index(stop)].strip()
    assert ask_streamed(client, messages, max_tokens=MAX_NEW_TOKENS, stop=stop)[0] == cut.choices[0].message.content
    sampled = [ask(client, messages, temperature=1.5, top_p=1, seed=seed, max_tokens=12).choices[0].message.content
               for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1] != sampled[2]


# ---------------------------------------------------------------------------------------------------- bad input


def test_every_bad_input_gets_its_4xx_and_the_next_request_is_answered(setup, server):
    httpx = need("httpx", "pip install httpx")
    client, media = server["client"], setup["media"]
    expected = ask(client, [{"role": "user", "content": "Hello there"}]).choices[0].message.content
    corrupt = "data:image/png;base64," + base64.b64encode(b"not an image at all").decode()
    big = "data:image/png;base64," + base64.b64encode(bytes(MAX_MEDIA + 1)).decode()
    png = data_url(media["image"], "image/png")
    bad_requests = {
        "corrupt image": (dict(messages=[user("Hi", image_part(corrupt))]), 400, "not a readable image"),
        "broken video": (dict(messages=[user("Hi", {"type": "video_url", "video_url": {
            "url": "data:video/mp4;base64," + base64.b64encode(b"\x00" * 64).decode()}})]), 400, "could not be decoded"),
        "media too large": (dict(messages=[user("Hi", image_part(big))]), 413, "at most 0.2 MiB per item"),
        "unknown media type": (dict(messages=[user("Hi", image_part("data:application/pdf;base64,AAAA"))]), 400,
                               "unsupported media type 'application/pdf'"),
        "unknown part type": (dict(messages=[user("Hi", {"type": "file", "file": {"file_id": "x"}})]), 400,
                              "does not match any of the expected tags"),
        "too many media": (dict(messages=[user("Hi", image_part(png), image_part(png))]), 400,
                           "at most 1 image, video or audio per user message"),
        "not base64": (dict(messages=[user("Hi", image_part("data:image/png;base64,@@@"))]), 400, "not valid base64"),
        "remote url": (dict(messages=[user("Hi", image_part("https://example.com/cat.png"))]), 400,
                       "remote URLs are not fetched"),
        "prompt too long": (dict(messages=[{"role": "user", "content": "word " * 600}]), 400,
                            f"this model reads at most {CONTEXT} tokens"),
        "roles out of order": (dict(messages=[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]),
                               400, "roles out of order"),
        "ends with assistant": (dict(messages=[{"role": "user", "content": "a"}, {"role": "assistant",
                                                                                   "content": "b"}]), 400,
                                "end with the user message"),
        "n > 1": (dict(messages=[{"role": "user", "content": "a"}], n=2), 400, "n=2 is not supported"),
        "temperature": (dict(messages=[{"role": "user", "content": "a"}], temperature=3), 400, "temperature"),
        "max_tokens": (dict(messages=[{"role": "user", "content": "a"}], max_tokens=0), 400, "max_tokens"),
        "tools": (dict(messages=[{"role": "user", "content": "a"}], tools=[{"type": "function", "function": {
            "name": "f"}}]), 400, "no tool calling"),
        "no messages": (dict(messages=[]), 400, "messages"),
        "unknown model": (dict(messages=[{"role": "user", "content": "a"}], model="gpt-4o"), 404,
                          "'gpt-4o' does not exist"),
        "body too large": (dict(messages=[{"role": "user", "content": "x" * (MAX_BODY + 10)}]), 413,
                           "accepts at most 2.0 MiB"),
    }
    for name, (request, status, message) in bad_requests.items():
        request = {"model": "tiny", **request}
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(**request)
        error = caught.value
        assert error.status_code == status, (name, error)
        assert message in error.message, (name, error.message)
        assert set(error.body) >= {"message", "type", "param", "code"}, name  # OpenAI's error shape
        assert str(setup["root"]) not in error.message and "mm-llama-serve-" not in error.message, \
            "no server paths in errors"
    with pytest.raises(openai.AuthenticationError, match="Incorrect or missing API key"):
        openai.OpenAI(base_url=server["base"] + "/v1", api_key="wrong", max_retries=0).models.list()
    response = httpx.post(server["base"] + "/v1/chat/completions", content=b'{"model": "tiny", "messages": [',
                          headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert response.status_code == 400 and "not valid JSON" in response.json()["error"]["message"]
    assert httpx.get(server["base"] + "/health").json()["status"] == "ok"  # no key needed
    assert ask(client, [{"role": "user", "content": "Hello there"}]).choices[0].message.content == expected


def test_a_full_queue_answers_429(setup, server):
    from mm_llama.frontends.serving.engine import BatchingEngine, Job
    from mm_llama.frontends.serving.schema import ApiError

    engine = BatchingEngine(setup["model"], setup["processor"], setup["embedder"], max_queue=2)  # not started

    def job(index: int) -> Job:
        return Job(id=str(index), conversation=[], prompt_tokens=1, max_tokens=1, temperature=0, top_p=1,
                   loop=None)

    engine.submit(job(0)), engine.submit(job(1))
    with pytest.raises(ApiError, match=r"2 requests are waiting \(--max_queue 2\)") as caught:
        engine.submit(job(2))
    assert caught.value.status == 429

    # Through HTTP: while one long answer decodes, the live engine queues at most 2; the others get 429 (the
    # client's RateLimitError) and every request that was queued is answered.
    client, live = server["client"], server["engine"]
    messages = [{"role": "user", "content": "Hello there"}]
    expected = ask(client, messages).choices[0].message.content
    live.max_queue = 2
    try:
        long = ask(client, messages, stream=True, max_tokens=CONTEXT)
        wait_until_decoding(long)

        def one(_: int):
            try:
                return ask(client, messages).choices[0].message.content
            except openai.RateLimitError as error:
                return error

        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(one, index) for index in range(6)]
            deadline = time.monotonic() + 30
            while sum(future.done() for future in futures) < 4 and time.monotonic() < deadline:
                time.sleep(0.02)  # the refused ones return at once; the 2 queued ones wait for the long answer
            long.close()  # its row stops, so the queued ones are answered now
            results = [future.result() for future in futures]
    finally:
        live.max_queue = 64
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    assert refused and all("--max_queue 2" in r.message for r in refused)
    assert all(r == expected for r in results if not isinstance(r, openai.RateLimitError))
    assert ask(client, messages).choices[0].message.content == expected


# ---------------------------------------------------------------------------------------------------- batching


def test_concurrent_requests_are_batched_and_each_answer_equals_its_own(setup, server, caplog):
    """32 requests from 16 concurrent clients (half streamed, some with an image): all answered, each equal to the
    same request alone; the engine ran batches of several rows."""
    client, engine = server["client"], server["engine"]
    prompts = [f"Question number {i}: what is shown?" for i in range(32)]
    image_url = data_url(setup["media"]["image"], "image/png")
    requests = [[user(prompt, image_part(image_url))] if i % 4 == 0 else [{"role": "user", "content": prompt}]
                for i, prompt in enumerate(prompts)]
    expected = [setup["session_answers"]([(prompt, "image" if i % 4 == 0 else None, setup["media"]["image"])])[0]
                for i, prompt in enumerate(prompts)]
    before = sum(count for size, count in engine.batch_sizes.items() if size > 1)

    def one(index: int) -> str:
        if index % 2:
            return ask_streamed(client, requests[index])[0]
        return ask(client, requests[index]).choices[0].message.content

    with caplog.at_level(logging.INFO, logger="mm_llama.frontends.serving"):
        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(one, range(32)))
    assert answers == expected
    assert sum(count for size, count in engine.batch_sizes.items() if size > 1) > before
    lines = [record.getMessage() for record in caplog.records if "tokens_in=" in record.getMessage()]
    assert len(lines) == 32 and all("latency=" in line and "tokens_out=" in line for line in lines)


def test_a_cancelled_stream_stops_its_row_and_the_batch_goes_on(setup, server, caplog):
    client = server["client"]
    messages = [{"role": "user", "content": "Hello there"}]
    expected = ask(client, messages).choices[0].message.content
    with caplog.at_level(logging.DEBUG, logger="mm_llama.frontends.serving"):
        with ThreadPoolExecutor(1) as pool:
            stream = ask(client, messages, stream=True, max_tokens=CONTEXT)
            other = pool.submit(lambda: ask(client, messages, max_tokens=MAX_NEW_TOKENS))  # usually the same batch
            wait_until_decoding(stream)
            stream.close()  # the client goes away
            assert other.result().choices[0].message.content == expected
        deadline = time.monotonic() + 20
        while not any("its row stopped after" in record.getMessage() for record in caplog.records):
            assert time.monotonic() < deadline, "the cancelled row was not stopped"
            time.sleep(0.05)
    stopped = next(r.getMessage() for r in caplog.records if "its row stopped after" in r.getMessage())
    assert int(stopped.split("after ")[1].split()[0]) < CONTEXT - 100  # stopped long before its max_tokens
    assert ask(client, messages).choices[0].message.content == expected


# ---------------------------------------------------------------------------------------------------- the command


def test_bad_options_and_a_busy_port_fail_before_loading_the_model(setup, server, capsys, monkeypatch):
    from mm_llama import loading
    from mm_llama.cli import main as cli

    def no_loading(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(loading, "load_model", no_loading)
    model = str(setup["stage1"])
    assert cli(["serve", model, "--port", str(server["port"])]) == 2
    assert f"127.0.0.1:{server['port']}" in capsys.readouterr().err
    assert cli(["serve", model, "--port", str(free_port()), "--max_batch_size", "0"]) == 2
    assert capsys.readouterr().err == "error: --max_batch_size must be >= 1\n"
    assert cli(["serve", model, "--port", str(free_port()), "--allowed_media_dir", str(setup["root"] / "nope")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_the_command_serves_and_finishes_running_requests_on_sigint(setup, server, tmp_path):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO_ROOT / "scripts" / "serve.py"), str(setup["stage1"]), "--device", "cpu",
               "--temperature", "0", "--max_new_tokens", str(MAX_NEW_TOKENS), "--served_model_name", "tiny",
               "--port", str(port)]
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, log.read_text()
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        messages = [{"role": "user", "content": "Hello there"}]
        expected = ask(server["client"], messages).choices[0].message.content
        assert ask(client, messages).choices[0].message.content == expected
        long = ask(client, messages, stream=True, max_tokens=300)
        wait_until_decoding(long)
        process.send_signal(signal.SIGINT)  # graceful shutdown: the running answer is finished first
        rest = list(long)
        assert rest[-1].choices[0].finish_reason in ("stop", "length")
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    text = log.read_text()
    assert text.count("tokens_in=") == 2 and "Traceback" not in text, text
