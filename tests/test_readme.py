"""The docs' examples run as written: docs/chat.md's Python example on tiny models, in this process (paths swapped;
tests/test_user_journey.py runs it unchanged in a new interpreter), and README's test command is the one CI runs."""

from __future__ import annotations

import re

import numpy as np
import PIL.Image
import torch

from doc_commands import REPO, python_blocks
from test_merge import save_stage1

README = (REPO / "README.md").read_text(encoding="utf-8")


def test_python_example_runs_on_cpu_with_its_imagebind_embedding(tmp_path, spm_model_path, capsys):
    from mm_llama.imagebind import ImageBindProcessor, ImageBindVisionConfig, ImageBindVisionModel

    model_dir = save_stage1(tmp_path / "mm-llama", spm_model_path)
    vision = tmp_path / "imagebind" / "vision"
    torch.manual_seed(0)
    ImageBindVisionModel(ImageBindVisionConfig.from_preset("tiny", image_size=32)).save_pretrained(vision)
    ImageBindProcessor(image_size=32).save_pretrained(vision)
    image = tmp_path / "cat.jpg"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(image)

    code = python_blocks(REPO / "docs" / "chat.md", "From Python")[0]
    for placeholder, path in (("outputs/mm-llama-7b", model_dir), ("checkpoints/imagebind_huge/vision", vision),
                              ("cat.jpg", image)):
        assert placeholder in code
        code = code.replace(f'"{placeholder}"', repr(str(path)))
    code = code.replace("max_new_tokens=128", "max_new_tokens=8")
    namespace: dict = {}
    exec(compile(code, "docs/chat.md", "exec"), namespace)
    printed = capsys.readouterr().out.strip()
    assert namespace["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert namespace["embedding"].shape == (1, 1024)
    # The answer is what the model says for that embedding, decoded as chat would.
    assert printed == namespace["processor"].decode(
        namespace["output"][0, namespace["inputs"]["input_ids"].shape[1]:], skip_special_tokens=True)


def test_readme_test_command_is_the_one_ci_runs():
    command = re.search(r"Run the tests:\n\n```bash\n(.*?)\n```", README).group(1)
    assert command in (REPO / ".ci" / "run").read_text()
