"""`import mm_llama` registers the Auto classes in every process, whatever is imported first, and a fresh process
loads a saved MM-LLaMA folder through the Auto classes with stdin closed: no trust_remote_code question."""

import subprocess
import sys

import pytest
from transformers import LlamaConfig

from conftest import tiny_llama_config_kwargs
from mm_llama import MMLlamaConfig, MMLlamaForCausalLM, MMLlamaProcessor, MMLlamaTokenizer

CHECK_REGISTERED = """
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
assert "mm_llama" in CONFIG_MAPPING, "MMLlamaConfig is not registered"
assert "imagebind_vision_model" in CONFIG_MAPPING, "ImageBindVisionConfig is not registered"
"""


def run_fresh(code: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=120, cwd=cwd, check=False)


# The package alone, with transformers imported after it, is the next test's order (each case costs a fresh
# interpreter's ~6 s of torch and transformers imports).
@pytest.mark.parametrize("first_import", [
    "import transformers; import mm_llama",                    # transformers first
    "from mm_llama.data.collator import MMLlamaDataCollator",  # a module that imports transformers while loading
    "from mm_llama.model.processing_mm_llama import MMLlamaProcessor",
])
def test_every_import_order_registers_the_auto_classes(first_import):
    result = run_fresh(first_import + "\n" + CHECK_REGISTERED)
    assert result.returncode == 0, result.stderr[-3000:]


def test_a_saved_folder_loads_through_the_auto_classes_in_a_fresh_process(tmp_path, spm_model_path):
    config = MMLlamaConfig(text_config=LlamaConfig(**tiny_llama_config_kwargs()), media_embed_dim=16)
    MMLlamaForCausalLM(config).save_pretrained(tmp_path)
    MMLlamaProcessor(MMLlamaTokenizer(vocab_file=str(spm_model_path))).save_pretrained(tmp_path)
    code = f"""
import mm_llama
from transformers import AutoImageProcessor, AutoModelForCausalLM, AutoProcessor
model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})
processor = AutoProcessor.from_pretrained({str(tmp_path)!r})
image_processor = AutoImageProcessor.from_pretrained({str(tmp_path)!r})
print(type(model).__name__, type(processor).__name__, type(image_processor).__name__)
"""
    # The stand-in for stdin is closed, so a trust_remote_code question would fail the load rather than hang.
    result = run_fresh(code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["MMLlamaForCausalLM", "MMLlamaProcessor", "ImageBindProcessor"]
    assert "custom code" not in result.stderr


def test_command_help_imports_neither_torch_nor_transformers():
    code = """
import sys
from mm_llama.cli import main
try:
    main(["train", "--help"]); main(["chat", "--help"])
except SystemExit:
    pass
heavy = sorted({"torch", "transformers"} & set(sys.modules))
assert not heavy, heavy
"""
    result = run_fresh(code)
    assert result.returncode == 0, result.stderr[-3000:]
