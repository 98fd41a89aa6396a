"""Loads a saved checkpoint with trust_remote_code in a subprocess where `mm_llama` cannot be imported."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

_SCRIPT = """
import importlib.abc, sys

class BlockMMLlama(importlib.abc.MetaPathFinder):
    # Makes `mm_llama` unimportable, even where it is pip-installed (editable or not).
    def find_spec(self, name, path=None, target=None):
        if name == "mm_llama" or name.startswith("mm_llama."):
            raise ImportError("mm_llama is blocked in this test")
        return None

sys.meta_path.insert(0, BlockMMLlama())
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({checkpoint!r}, trust_remote_code=True).eval()
assert type(model).__name__ == "MMLlamaForCausalLM", type(model)
assert not type(model).__module__.startswith("mm_llama"), type(model).__module__
assert "mm_llama" not in sys.modules
io = torch.load({io_file!r})
with torch.no_grad():
    logits = model(input_ids=io["ids"], media_embeds=io["embeds"]).logits
torch.testing.assert_close(logits, io["expected"], rtol={tolerance!r}, atol={tolerance!r})
print("REMOTE_OK")
"""


def assert_remote_code_logits(checkpoint: Path, ids: torch.Tensor, embeds: torch.Tensor, expected: torch.Tensor,
                              workdir: Path, tolerance: float = 0.0) -> None:
    """Asserts that `checkpoint`, loaded with trust_remote_code without the package, gives `expected` logits."""
    io_file = workdir / "io.pt"
    torch.save({"ids": ids, "embeds": embeds, "expected": expected}, io_file)
    script = workdir / "remote.py"
    script.write_text(textwrap.dedent(_SCRIPT.format(checkpoint=str(checkpoint), io_file=str(io_file),
                                                     tolerance=tolerance)))
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(workdir / "modules")
    result = subprocess.run([sys.executable, script.name], cwd=workdir, env=env, capture_output=True, text=True,
                            timeout=300)
    assert "REMOTE_OK" in result.stdout, result.stderr[-3000:]
