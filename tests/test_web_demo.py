"""`mm-llama web` (mm_llama/frontends/web.py): the chat logic without a server (answers equal direct greedy generation, history
from both shapes Gradio passes, every kind of bad input answered in the chat, a stopped stream stops generating), two
concurrent API conversations through a live server, and a real headless Chromium session against
`scripts/web_demo.py`.

Expected answers come from direct greedy `model.generate` calls (`test_chat_cli.expected_answer`) on embeddings the
test computes with the same tiny ImageBind. The browser test needs Debian's `chromium` + `chromium-driver` and the
`[web]` extra (gradio, selenium, gradio_client); it is skipped, saying so, only when they are absent.
"""

from __future__ import annotations

import inspect
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch

from mm_llama.cli import main as cli
from mm_llama.generation import GenerationSettings, MediaEmbedder
from mm_llama.frontends.web import ERROR_TITLE, GenerationCancelled, UserInputError, WebChat, answered_turns, image_suffixes
from conftest import EXTRAS_REQUIRED, need
from test_chat_cli import MAX_NEW_TOKENS, expected_answer, user
from test_merge import REPO_ROOT, save_stage1

QUESTION = "What is in the image?"
FOLLOW_UP = "What colour is it?"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, spm_model_path):
    """A tiny stage-1 model without a vision tower, a standalone tiny ImageBind folder, two images whose answers
    differ, and bad files."""
    from transformers import AutoModelForCausalLM

    from mm_llama import MMLlamaProcessor
    from mm_llama.imagebind import load_image
    from mm_llama.testing_utils import tiny_imagebind

    root = tmp_path_factory.mktemp("web")
    stage1 = save_stage1(root / "stage1", spm_model_path)
    # Weights 10x the default init: with the default, every image gets nearly the same embedding (cosine 0.998).
    encoder = tiny_imagebind(image_size=32, seed=0, initializer_range=0.2).eval()
    encoder.save_pretrained(root / "imagebind")
    halves = np.zeros((36, 50, 3), dtype=np.uint8)
    halves[:, :25] = 255
    pixels = [np.random.default_rng(0).integers(0, 256, (36, 50, 3), dtype=np.uint8), halves]
    images, vectors = [], []
    for index, array in enumerate(pixels):
        path = root / f"photo{index}.png"
        PIL.Image.fromarray(array).save(path)
        with torch.no_grad():
            vectors.append(encoder.embed_images(load_image(path, 32)[None])[0])
        images.append(path)
    (root / "corrupt.png").write_bytes(b"not an image at all")
    (root / "empty.jpg").write_bytes(b"")
    (root / "notes.txt").write_text("hello")
    (root / "sound.wav").write_bytes(b"RIFF" + bytes(64))  # never decoded: this ImageBind folder has no audio model
    model = AutoModelForCausalLM.from_pretrained(stage1).eval()
    processor = MMLlamaProcessor.from_pretrained(stage1)
    answers = [expected_answer(model, processor, [user(QUESTION, image)], [vector])
               for image, vector in zip(images, vectors)]
    assert answers[0] != answers[1], "the two test images must get different answers for the tests to mean anything"
    embedder = MediaEmbedder.for_model(model, processor, imagebind=root / "imagebind", device="cpu", cache_size=4096)
    return dict(root=root, stage1=stage1, images=images, vectors=vectors, model=model, processor=processor,
                answers=answers, embedder=embedder)


def follow_up_answer(setup, index: int) -> str:
    """The answer to FOLLOW_UP after QUESTION about image `index` and its answer (the image stays in the prompt)."""
    turns = [user(QUESTION, setup["images"][index]), {"role": "assistant", "content": setup["answers"][index]},
             user(FOLLOW_UP)]
    return expected_answer(setup["model"], setup["processor"], turns, [setup["vectors"][index]])


def final(replies) -> str | dict:
    *_, last = replies
    return last


def ask(chat: WebChat, text: str, files=(), history=(), **settings):
    settings = {"temperature": 0, "max_new_tokens": MAX_NEW_TOKENS, **settings}
    return final(chat.respond({"text": text, "files": [str(f) for f in files]}, list(history), **settings))


# ---------------------------------------------------------------------------------------------------- chat logic


def test_upload_kinds_follow_infer_media_type_and_only_decodable_images_are_accepted():
    chat = SimpleNamespace(image_suffixes=image_suffixes())  # media_type reads nothing else of the WebChat
    kinds = {name: WebChat.media_type(chat, name) for name in ("clip.MP4", "talk.wav", "photo.webp", "scan.JPG")}
    assert kinds == {"clip.MP4": "video", "talk.wav": "audio", "photo.webp": "image", "scan.JPG": "image"}
    for name in ("notes.txt", "embedding.pt"):  # infer_media_type's default "image" is refused for an upload
        with pytest.raises(UserInputError, match=f"'{name}' is not an image, a video or an audio file"):
            WebChat.media_type(chat, f"/cache/{name}")


def test_history_in_both_gradio_shapes_gives_the_answered_turns_only():
    browser_shape = [  # what the browser's chatbot state holds (Gradio 6 content parts)
        {"role": "user", "content": [{"type": "file", "file": {"path": "/c/a.png"}}, {"type": "text", "text": "Hi"}],
         "metadata": None},
        {"role": "assistant", "content": [{"type": "text", "text": "Hello"}], "metadata": None},
        {"role": "user", "content": [{"type": "file", "file": {"path": "/c/bad.png"}}, {"type": "text", "text": "?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "broken"}], "metadata": {"title": ERROR_TITLE}},
        {"role": "user", "content": [{"type": "text", "text": "stopped before the first token"}]},
        {"role": "user", "content": [{"type": "text", "text": "More"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Sure"}]},
    ]
    api_shape = [  # what an API client's history holds (ChatInterface's own message dicts)
        {"role": "user", "content": [{"path": "/c/a.png"}, "Hi"]},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": [{"path": "/c/bad.png"}, "?"]},
        {"role": "assistant", "content": "broken", "metadata": {"title": ERROR_TITLE}},
        {"role": "user", "content": ["stopped before the first token"]},
        {"role": "user", "content": ["More"]},
        {"role": "assistant", "content": "Sure"},
    ]
    expected = [("Hi", ["/c/a.png"], "Hello"), ("More", [], "Sure")]
    assert answered_turns(browser_shape) == expected
    assert answered_turns(api_shape) == expected


def test_answers_equal_direct_generation_and_bad_input_is_answered_in_the_chat(setup):
    chat = WebChat(setup["model"], setup["processor"], setup["embedder"], max_media=1)
    image = setup["images"][0]
    answer = ask(chat, QUESTION, [image])
    assert answer == setup["answers"][0]
    history = [{"role": "user", "content": [{"path": str(image)}, QUESTION]}, {"role": "assistant", "content": answer}]
    assert ask(chat, FOLLOW_UP, history=history) == follow_up_answer(setup, 0)
    # The system prompt box goes in front, as in ChatSession.
    with_system = ask(chat, QUESTION, [image], system_prompt="Be brief.")
    assert with_system == expected_answer(setup["model"], setup["processor"],
                                          [{"role": "system", "content": "Be brief."}, user(QUESTION, image)],
                                          [setup["vectors"][0]])

    root = setup["root"]
    bad_requests = {
        "not media": (dict(text="Hi", files=[root / "notes.txt"]), "'notes.txt' is not an image, a video or an audio"),
        "no audio model": (dict(text="Hi", files=[root / "sound.wav"]), "'sound.wav' is raw audio, but no ImageBind"),
        "corrupt": (dict(text="Hi", files=[root / "corrupt.png"]), "'corrupt.png' is not a readable image"),
        "empty": (dict(text="Hi", files=[root / "empty.jpg"]), "'empty.jpg' is empty (0 bytes)"),
        "two files": (dict(text="Hi", files=setup["images"]), "2 files in one message"),
        "empty message": (dict(text="  "), "The message is empty"),
        "second image": (dict(text="Hi", files=[setup["images"][1]], history=history),
                         "takes at most 1 per conversation"),
        "over-long": (dict(text="word " * 600), "the model reads at most 512"),
        "temperature": (dict(text="Hi", temperature=-1), "temperature must be between 0"),
        "temperature missing": (dict(text="Hi", temperature=None), "temperature must be between 0"),
        "top_p": (dict(text="Hi", top_p=0), "top_p must be in (0, 1]"),
        "max_new_tokens": (dict(text="Hi", max_new_tokens=0), "max_new_tokens must be between 1"),
    }
    for name, (request, message) in bad_requests.items():
        reply = ask(chat, **request)
        assert isinstance(reply, dict) and reply["metadata"] == {"title": ERROR_TITLE}, (name, reply)
        assert message in reply["content"], (name, reply["content"])
        assert str(root) not in reply["content"], "the user sees the file's name, not the server's cache path"
    # A history that holds all those failed turns still gives the follow-up its own answer: they are left out.
    for request, _ in bad_requests.values():
        if "history" not in request:
            files = request.get("files", [])
            history += [{"role": "user", "content": [{"path": str(f)} for f in files] + [request["text"]]},
                        {"role": "assistant", "content": "x", "metadata": {"title": ERROR_TITLE}}]
    assert ask(chat, FOLLOW_UP, history=history) == follow_up_answer(setup, 0)


def test_the_answer_is_clipped_to_the_context_left(setup):
    chat = WebChat(setup["model"], setup["processor"], setup["embedder"], context_length=None)
    prompt_tokens = setup["processor"]([user("Hi")], add_generation_prompt=True)["input_ids"].shape[1]
    chat.context_length = prompt_tokens + 3
    reply = ask(chat, "Hi", max_new_tokens=50)
    assert reply == expected_answer_n(setup, [user("Hi")], 3)


def expected_answer_n(setup, messages, max_new_tokens: int) -> str:
    processor = setup["processor"]
    inputs = processor(messages, add_generation_prompt=True)
    with torch.no_grad():
        out = setup["model"].generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                      pad_token_id=processor.pad_token_id)
    return processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def test_closing_the_stream_stops_the_generation(setup, monkeypatch):
    """The stop button / a closed tab closes the generator; the generation thread must stop, not run to the end."""
    model = setup["model"]
    finished, outcome = threading.Event(), []
    original = model.generate

    class SlowStreamer:  # 10 ms a token: the generation cannot finish before the test closes the stream
        def __init__(self, streamer):
            self.streamer = streamer

        def put(self, value):
            time.sleep(0.01)
            self.streamer.put(value)

        def end(self):
            self.streamer.end()

    def recording_generate(*args, streamer, **kwargs):
        try:
            result = original(*args, **kwargs, streamer=SlowStreamer(streamer),
                              min_new_tokens=kwargs["max_new_tokens"])  # no early end of sequence
            outcome.append(result.shape[1])
            return result
        except BaseException as error:
            outcome.append(error)
            raise
        finally:
            finished.set()

    monkeypatch.setattr(model, "generate", recording_generate)
    chat = WebChat(model, setup["processor"], setup["embedder"])
    replies = chat.respond({"text": "Hi", "files": []}, [], temperature=0, max_new_tokens=400)
    next(replies)
    replies.close()
    assert finished.wait(30)
    assert len(outcome) == 1 and isinstance(outcome[0], GenerationCancelled), outcome


def test_web_command_without_gradio_says_what_to_install(setup, monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gradio" else find_spec(name, *a))
    assert cli(["web", str(setup["stage1"]), "--device", "cpu"]) == 1
    assert capsys.readouterr().err == ('error: gradio is not installed; the web demo needs it: '
                                       'pip install "mm-llama[web]"\n')


# ---------------------------------------------------------------------------------------------------- live server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_concurrent_api_conversations_each_get_their_own_answers_one_generation_at_a_time(setup, monkeypatch,
                                                                                                tmp_path):
    need("gradio", 'pip install "mm-llama[web]"')
    gradio_client = need("gradio_client", 'pip install "mm-llama[web]"')
    from mm_llama.frontends.web import build_app, launch

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    model = setup["model"]
    active, peak, lock = [0], [0], threading.Lock()
    original = model.generate

    def counting_generate(*args, **kwargs):  # slow enough that two unqueued requests would overlap
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            time.sleep(0.5)
            return original(*args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(model, "generate", counting_generate)
    chat = WebChat(model, setup["processor"], setup["embedder"])
    app = build_app(chat, defaults=GenerationSettings(MAX_NEW_TOKENS, 0.0, 0.9), concurrency_limit=1)
    port = free_port()
    launch(app, port=port, prevent_thread_lock=True, quiet=True)
    try:
        results: dict[int, list] = {}

        def conversation(index: int) -> None:
            client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
            image = gradio_client.handle_file(str(setup["images"][index]))
            first = client.predict({"text": QUESTION, "files": [image]}, "", 0, 0.9, MAX_NEW_TOKENS, api_name="/chat")
            second = client.predict({"text": FOLLOW_UP, "files": []}, "", 0, 0.9, MAX_NEW_TOKENS, api_name="/chat")
            results[index] = [first, second]

        threads = [threading.Thread(target=conversation, args=(index,)) for index in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        for index in range(2):
            assert results[index] == [setup["answers"][index], follow_up_answer(setup, index)], index
        assert peak[0] == 1  # the queue ran one generation at a time
    finally:
        app.close()


@pytest.fixture(scope="module")
def web_server(setup, tmp_path_factory):
    """`scripts/web_demo.py` serving the tiny model on 127.0.0.1 (greedy, 2 media per conversation)."""
    need("gradio", 'pip install "mm-llama[web]"')
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1",
           "GRADIO_TEMP_DIR": str(tmp_path_factory.mktemp("gradio"))}
    log = tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "scripts" / "web_demo.py"), str(setup["stage1"]), "--imagebind",
             str(setup["root"] / "imagebind"), "--device", "cpu", "--port", str(port), "--temperature", "0",
             "--max_new_tokens", str(MAX_NEW_TOKENS), "--max_media", "2"],
            stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the web demo did not start:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
    yield url
    process.terminate()
    process.wait(30)


@pytest.fixture
def chromium():
    if CHROMIUM is None or CHROMEDRIVER is None:
        (pytest.fail if EXTRAS_REQUIRED else pytest.skip)(
            "needs Chromium and its WebDriver (/usr/bin/chromium, /usr/bin/chromedriver): "
            "apt-get install chromium chromium-driver")
    return need("selenium.webdriver", 'pip install selenium (in the "dev" extra)')


def test_browser_session_image_answer_corrupt_file_and_follow_up(setup, chromium, web_server, tmp_path):
    webdriver = chromium
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                 f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}"):  # the network is not needed, nor reached
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
    wait = WebDriverWait(driver, 60)

    def rows():
        return driver.find_elements(By.CSS_SELECTOR, "#mm-llama-chat .message-row")

    def send(text: str, path: Path | None = None) -> None:
        if path is not None:
            wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#mm-llama-input input[type=file]")).send_keys(
                str(path))
            wait.until(lambda d: path.name in d.find_element(By.CSS_SELECTOR, "#mm-llama-input").get_attribute(
                "innerHTML"))  # the upload finished and shows in the textbox
        box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#mm-llama-input textarea"))
        box.send_keys(text, Keys.ENTER)

    def bot_reply(row_count: int, predicate) -> str:
        """Waits for the bot row after `row_count` rows to satisfy `predicate(label)` (the streamed answer is
        complete); returns its label ("bot's message: ..." with the text as Gradio shows it)."""
        def done(_):
            if len(rows()) <= row_count:
                return False
            labels = [e.get_attribute("aria-label") for e in rows()[row_count].find_elements(
                By.CSS_SELECTOR, "[data-testid=bot]")]
            return labels and predicate(labels[0]) and labels[0]
        return wait.until(done)

    def shown(answer: str) -> str:
        return "bot's message: " + inspect.cleandoc(answer)  # Gradio's Chatbot cleandoc()s text (tabs to spaces)

    try:
        driver.get(web_server)
        artefacts = Path(os.environ.get("MM_LLAMA_TEST_ARTIFACTS", tmp_path))  # CI keeps this folder
        artefacts.mkdir(parents=True, exist_ok=True)
        image = setup["images"][0]
        send(QUESTION, image)
        bot_reply(1, lambda label: label == shown(setup["answers"][0]))
        assert driver.save_screenshot(str(artefacts / "web_demo_image_turn.png"))
        user_row = rows()[0]
        assert "user-row" in user_row.get_attribute("class")
        image_src = [img.get_attribute("src") for img in user_row.find_elements(By.TAG_NAME, "img")]
        assert len(image_src) == 1 and image_src[0].endswith("/" + image.name)  # the image in the question's turn
        assert f"user's message: {QUESTION}" in [e.get_attribute("aria-label") for e in
                                                 user_row.find_elements(By.CSS_SELECTOR, "[data-testid=user]")]

        send("And this one?", setup["root"] / "corrupt.png")
        error = bot_reply(3, lambda label: "corrupt.png" in label)
        assert "'corrupt.png' is not a readable image" in error
        assert ERROR_TITLE in rows()[3].text

        send(FOLLOW_UP)  # answered as if the failed turn had not happened
        bot_reply(5, lambda label: label == shown(follow_up_answer(setup, 0)))
        assert driver.save_screenshot(str(artefacts / "web_demo.png"))

        driver.find_element(By.CSS_SELECTOR, "#mm-llama-new").click()  # a new conversation forgets the old one
        wait.until(lambda _: not rows())
        send(QUESTION, setup["images"][1])
        bot_reply(1, lambda label: label == shown(setup["answers"][1]))
    finally:
        driver.quit()
