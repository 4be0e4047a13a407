"""Quantized experts: every ``com.microsoft.MoE`` node of a graph becomes a ``com.microsoft.QMoE`` node.

onnxruntime's QMoE kernels read their integer expert weights in two layouts, one per provider, so the graph's
dtype picks the layout as it picks the provider (fp32 graphs run on the CPU, fp16 graphs on CUDA):

* **CPU** (fp32 graphs): the MoE layout (``[experts, out, in]``, gate and up rows interleaved), packed along
  ``in``, with fp16 scales (the kernel takes half-precision scales beside float32 activations; float32 ones would
  be 0.8 GB of LLaDA-MoE's int4 export at blocks of 32; an fp16 scale above 6.1e-5 is within 2^-11 of the exact
  one, against int4's own rounding of up to 1/14 of the block's largest, and the values are rounded against it);
  the zero point is implicit (``2^(bits-1)``).

  * ``int4``: symmetric 4-bit in blocks of ``block_size`` along ``in`` (scales ``[E, out, in / block]``), two
    values a byte, the even one in the low nibble;
  * ``int8``: symmetric 8-bit per output channel (scales ``[E, out]``; onnxruntime 1.32's CPU kernel reads
    block-wise 8-bit scales differently from the documented layout, per-channel ones as documented).

  The CPU kernel renormalises the top-k weights by itself unless it is given ``router_weights``. LLaDA-MoE mixes
  with the raw softmax probabilities, so the QMoE node gets the softmax of the router logits (in float32, as the
  official code) as ``router_weights``: the logits still choose the experts, the probabilities weight them.
  Checked against a dequantized reference to 2e-5 (tests/test_llada_moe.py).

* **CUDA** (fp16 graphs, ``int4``): the CUDA kernel's CUTLASS mixed-precision GEMMs read each expert's weights
  transposed and interleaved (``[E, in, out / 2]``, scales ``[E, out, in / block]`` in fp16), as
  ``onnxruntime.quantization.cuda_quantizer`` quantizes and packs them (kept with the kernel that reads them; torch
  runs the packing, on the CPU when there is no GPU). Its SM80 layout is the one every CUDA GPU from SM75 on
  reads: Hopper runs mixed-precision experts on its Ampere-class kernels (an H200 computed LLaDA-MoE's real expert
  shape within 1e-4 mean error of the dequantized reference with it, and wrongly with the SM90 layout). The CUDA
  kernel mixes with the raw softmax probabilities when ``normalize_routing_weights=0``, as its float MoE kernel
  does, so it takes the router logits alone.

The float expert weights are read one tensor at a time, memory-mapped from the data file, and never loaded
whole; each tensor is quantized expert by expert on every core.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .staging import ExportError

ROUTER_WEIGHTS_INPUT = 14  # QMoE's optional inputs before it: biases, fc3, zero points
CUDA_LAYOUT_ARCH = 80  # onnxruntime's SM80 mixed-GEMM layout (see the module docstring)
CUDA_BLOCK_SIZES = (32, 64, 128)  # the block sizes the CUDA kernel was measured to compute correctly


class QuantizationError(ExportError):
    """The quantization cannot be done as asked; the message says what to change."""


def experts_layout(dtype: str) -> str:
    """The provider a graph's quantized experts are laid out for: ``"cpu"`` for fp32 graphs, ``"cuda"`` for fp16."""
    return "cuda" if dtype == "fp16" else "cpu"


def quantize_experts(model, folder: Path, method: str, block_size: int) -> int:
    """Rewrite ``model``'s MoE nodes in place (weights read from ``folder``); returns how many."""
    from onnx import TensorProto, helper, numpy_helper

    initializers = {t.name: t for t in model.graph.initializer}
    rewritten = 0
    for index, node in enumerate(list(model.graph.node)):
        if node.op_type != "MoE" or node.domain != "com.microsoft":
            continue
        if not node.name:
            node.name = f"moe_{index}"
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        x, logits, fc1_name, fc2_name = node.input[0], node.input[1], node.input[2], node.input[4]
        weight_type = initializers[fc1_name].data_type
        cuda = experts_layout("fp16" if weight_type == TensorProto.FLOAT16 else "fp32") == "cuda"
        outs = []
        for name in (fc1_name, fc2_name):
            weight = read_weight(initializers[name], folder)
            if cuda:
                packed, scales = quantize_int4_for_cuda(weight, block_size)
            else:
                packed, scales = quantize_int4(weight, block_size) if method == "int4" else quantize_int8(weight)
            for suffix, array in (("_q", packed), ("_scales", scales)):
                model.graph.initializer.append(numpy_helper.from_array(array, name + suffix))
            outs.append((name + "_q", name + "_scales"))
            model.graph.initializer.remove(initializers[name])
        inputs, extra = [x, logits, *outs[0], "", *outs[1]], []
        if not cuda:
            float_logits, probs = f"{node.name}_router_float", f"{node.name}_router_weights"
            extra = [helper.make_node("Cast", [logits], [float_logits], to=TensorProto.FLOAT,
                                      name=f"{node.name}_cast"),
                     helper.make_node("Softmax", [float_logits], [probs + "_f"], axis=-1,
                                      name=f"{node.name}_softmax"),
                     helper.make_node("Cast", [probs + "_f"], [probs], to=weight_type, name=f"{node.name}_cast_back")]
            inputs += [""] * (ROUTER_WEIGHTS_INPUT - len(inputs)) + [probs]
        qmoe = helper.make_node(
            "QMoE", inputs, list(node.output), domain="com.microsoft", name=node.name, k=attrs["k"],
            activation_type=attrs["activation_type"], swiglu_fusion=attrs["swiglu_fusion"],
            activation_alpha=attrs["activation_alpha"], activation_beta=attrs["activation_beta"],
            normalize_routing_weights=0, expert_weight_bits=4 if method == "int4" else 8,
            **({"block_size": block_size} if method == "int4" else {}))
        model.graph.node.remove(node)
        for offset, new in enumerate([*extra, qmoe]):
            model.graph.node.insert(index + offset, new)
        rewritten += 1
    return rewritten


def quantize_int4(weight: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``[E, N, K]`` float -> packed uint8 ``[E, N, K / 2]`` and fp16 scales ``[E, N, K / block]`` (the values are
    rounded against the fp16 scales, the ones the kernel multiplies by)."""
    experts, rows, cols = weight.shape
    if cols % block_size:
        raise QuantizationError(f"an expert's input width {cols} is not a multiple of the block size {block_size}")
    packed = np.empty((experts, rows, cols // 2), dtype=np.uint8)
    scales = np.empty((experts, rows, cols // block_size), dtype=np.float16)

    def one(e: int) -> None:
        blocks = weight[e].astype(np.float32).reshape(rows, cols // block_size, block_size)
        scale = (np.abs(blocks).max(-1) / 7).astype(np.float16)
        safe = np.where(scale == 0, 1, scale.astype(np.float32))
        q = (np.clip(np.round(blocks / safe[..., None]), -8, 7).astype(np.int16) + 8).astype(np.uint8)
        q = q.reshape(rows, cols)
        packed[e], scales[e] = q[:, 0::2] | (q[:, 1::2] << 4), scale

    _each_expert(one, experts)
    return packed, scales


def quantize_int4_for_cuda(weight: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """``[E, N, K]`` float -> the CUDA kernel's packed uint8 ``[E, K, N / 2]`` and fp16 scales ``[E, N, K / block]``."""
    import onnxruntime
    import torch

    try:
        from onnxruntime.quantization.cuda_quantizer import CudaQuantizer
    except ImportError:
        raise QuantizationError(f"onnxruntime {onnxruntime.__version__} has no CUDA expert quantizer "
                                "(onnxruntime.quantization.cuda_quantizer): install onnxruntime >= 1.32 or "
                                "onnxruntime-gpu >= 1.31.1 to quantize experts for CUDA") from None
    experts, rows, cols = weight.shape
    if cols % 64 or rows % 16:
        raise QuantizationError(f"an expert's weight [{rows}, {cols}] cannot be laid out for onnxruntime's CUDA "
                                "expert kernel, which needs an input width that is a multiple of 64 and an output "
                                "width that is a multiple of 16; quantize an fp32 export for the CPU instead")
    packed = np.empty((experts, cols, rows // 2), dtype=np.uint8)
    scales = np.empty((experts, rows, cols // block_size), dtype=np.float16)

    def one(e: int) -> None:
        q, s = CudaQuantizer.qmoe_prepacked_blockwise_quantize(
            torch.from_numpy(np.asarray(weight[e], dtype=np.float32)), 4, block_size, CUDA_LAYOUT_ARCH)
        packed[e], scales[e] = q.numpy(), s.numpy()

    _each_expert(one, experts)
    return packed, scales


def quantize_int8(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[E, N, K]`` float -> uint8 ``[E, N, K]`` (zero point 128) and fp16 per-channel scales ``[E, N]`` (the
    values rounded against them)."""
    q = np.empty(weight.shape, dtype=np.uint8)
    scales = np.empty(weight.shape[:2], dtype=np.float16)

    def one(e: int) -> None:
        w = weight[e].astype(np.float32)
        scale = (np.abs(w).max(-1) / 127).astype(np.float16)
        safe = np.where(scale == 0, 1, scale.astype(np.float32))
        q[e] = (np.clip(np.round(w / safe[..., None]), -128, 127).astype(np.int16) + 128).astype(np.uint8)
        scales[e] = scale

    _each_expert(one, len(weight))
    return q, scales


def _each_expert(quantize, experts: int) -> None:
    """``quantize(e)`` for every expert, on every core (numpy releases the GIL in its array loops), one expert's
    temporaries at a time per core instead of the whole stack's: LLaDA2-mini has 15B expert weights."""
    with ThreadPoolExecutor(min(experts, os.cpu_count() or 1)) as pool:
        list(pool.map(quantize, range(experts)))


def read_weight(tensor, folder: Path) -> np.ndarray:
    """An initializer's array, memory-mapped from its external data file when it has one."""
    from onnx import TensorProto, helper, numpy_helper

    if tensor.data_location != TensorProto.EXTERNAL:
        return numpy_helper.to_array(tensor)
    info = {e.key: e.value for e in tensor.external_data}
    dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
    return np.memmap(folder / info["location"], dtype=dtype, mode="r", offset=int(info.get("offset", 0)),
                     shape=tuple(tensor.dims))
