"""The architecture registry: dispatch on ``architectures[0]``, a clear refusal of unknown ones, and a new
architecture added by one module and its registry entry alone (exported, validated, run token-exact)."""

from __future__ import annotations

import importlib
import json
import sys

import numpy as np
import pytest
import torch

from llada_onnx.models import UnsupportedConfigError, architecture_of, generate, make_tiny_model, supported
from llada_onnx.models import registry
from llada_onnx.runtime import Manifest, Pipeline

from conftest import prompts

# Everything a new architecture needs: its config class, its torch module and one register() call.
ECHO_MODULE = '''
from llada_onnx.models import llada
from llada_onnx.models.config import LLaDAConfig
from llada_onnx.models.modeling import LLaDAModel
from llada_onnx.models.registry import Architecture, register


class EchoConfig(LLaDAConfig):
    """Dense LLaDA's fields under another architecture name."""


class EchoModel(LLaDAModel):
    """Dense LLaDA with its logits doubled: another function of the same tensors."""

    def lm_head(self, h):
        return 2 * super().lm_head(h)


ECHO = register(Architecture(
    name="EchoLLaDAModelLM", description="a test architecture", config=EchoConfig, model=EchoModel,
    sampler="llada", graph_kinds=("forward",), parameter_count=llada.parameter_count, sizes=llada.sizes,
    summary=llada.summary))
'''


def test_architectures_are_registered_and_dispatched_on_architectures():
    assert [a.name for a in supported()][:3] == ["LLaDAModelLM", "LLaDA2MoeModelLM", "LLaDAMoEModelLM"]
    assert architecture_of({"architectures": ["LLaDAModelLM"], "model_type": "llada"}).sampler == "llada"
    assert architecture_of({"model_type": "llada"}).name == "LLaDAModelLM"  # configs without architectures
    # LLaDA-MoE shares dense LLaDA's model_type: architectures[0] tells them apart
    assert architecture_of({"architectures": ["LLaDAMoEModelLM"], "model_type": "llada"}).experts
    assert architecture_of({"model_type": "llada2_moe"}).sampler == "block_diffusion"
    with pytest.raises(UnsupportedConfigError, match="'LLaDA3ModelLM' is not a LLaDA checkpoint .* supported "
                                                     "architectures: LLaDAModelLM \\(dense LLaDA.*LLaDAMoEModelLM"):
        architecture_of({"architectures": ["LLaDA3ModelLM"], "model_type": "llada3"})


@pytest.fixture
def echo(tmp_path, monkeypatch):
    (tmp_path / "echo_architecture.py").write_text(ECHO_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("echo_architecture")
    yield module
    registry._ARCHITECTURES.pop(module.ECHO.name)
    sys.modules.pop("echo_architecture")


def test_a_new_architecture_is_one_module_and_one_registry_entry(tmp_path, echo):
    from llada_onnx.export import ExportError, export
    from llada_onnx.models.tiny import LLADA_CHAT_TEMPLATE, write_tiny_tokenizer_files

    dense = make_tiny_model(n_layers=2, d_model=64, n_heads=4, seed=5)
    model = echo.EchoModel(echo.EchoConfig(**vars(dense.config)))
    model.load_state_dict(dense.state_dict())
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    write_tiny_tokenizer_files(ckpt, model.config, chat_template=LLADA_CHAT_TEMPLATE)
    assert json.loads((ckpt / "config.json").read_text())["architectures"] == ["EchoLLaDAModelLM"]

    with pytest.raises(ExportError, match="--cache does not apply to EchoLLaDAModelLM: it has no KV-cache graph"):
        export(ckpt, tmp_path / "cached", cache=True, progress=False)
    out = tmp_path / "onnx"
    export(ckpt, out, progress=False)  # validated against EchoModel, doubled logits and all
    manifest = Manifest.load(out)
    assert (manifest.architecture, manifest.sampler) == ("EchoLLaDAModelLM", "llada")

    ids, mask = prompts(2, seed=3)
    kw = dict(steps=8, gen_length=8, block_length=4, temperature=0.5, seed=1)
    want = generate(model, torch.from_numpy(ids), torch.from_numpy(mask), **kw).numpy()
    np.testing.assert_array_equal(Pipeline.from_pretrained(out).generate_ids(ids, mask, **kw), want)
    doubled = Pipeline.from_pretrained(out).graph.run(ids, mask, np.array([[0], [0]]), logits=True).logits
    with torch.no_grad():
        plain = dense(torch.from_numpy(ids), torch.from_numpy(mask), torch.tensor([[0], [0]]), always_mask=True)
    np.testing.assert_allclose(doubled, 2 * plain.numpy(), rtol=0, atol=1e-3)
