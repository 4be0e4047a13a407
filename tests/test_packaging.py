"""The package as users get it: a wheel that holds the runtime and the default model (and no tests or benchmark
results), installed without the source tree, running the README's Python example from the clone root."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_installs_and_runs_from_the_clone_root(tmp_path):
    source = tmp_path / "source"  # a copy: an in-tree build would leave build/ and *.egg-info in the clone
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info",
                                                                "__pycache__", ".pytest_cache", ".bench", "work-tmp",
                                                                ".whl", ".ortgpu", ".gl", "results"))
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist"),
                    str(source)], check=True, capture_output=True, timeout=600)
    wheel, = (tmp_path / "dist").glob("llada_onnx-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("llada_onnx/__init__.py", "llada_onnx/cli.py", "llada_onnx/runtime/pipeline.py",
                   "llada_onnx/export/exporter.py", "llada_onnx/models/modeling.py",
                   "llada_onnx/default_model/onnx/model.onnx", "llada_onnx/default_model/onnx/model.onnx.data",
                   "llada_onnx/default_model/onnx/tokenizer.json",
                   "llada_onnx/default_model/checkpoint/model.safetensors"):
        assert needed in names, needed
    assert not [n for n in names if n.startswith(("tests/", "bench/", "llada_onnx/tests", "llada_onnx/bench"))]

    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--quiet", "--target",
                    str(site), str(wheel)], check=True, capture_output=True, timeout=600)
    example = textwrap.dedent(f"""
        import sys
        sys.modules["torch"] = None  # the runtime never imports torch
        from llada_onnx import Pipeline
        import llada_onnx
        assert llada_onnx.__file__.startswith({str(site)!r}), llada_onnx.__file__

        pipe = Pipeline.from_pretrained()                      # the embedded default model, CPU
        print(pipe.generate("ROMEO."))                          # base model: raw text in, continuation out
    """)
    env = dict(os.environ, PYTHONPATH=str(site))
    res = subprocess.run([sys.executable, "-c", example], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.split()) > 10
