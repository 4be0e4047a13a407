"""The benchmark command in CI size: tiny model, 2 repetitions; checks only that the report is well formed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: bench/ is not in the package

from bench.run import main  # noqa: E402


def test_bench_smoke(tmp_path):
    out = tmp_path / "report"
    assert main(["--models", "tiny", "--settings", "8", "--batches", "1", "--reps", "2", "--prompt-length", "8",
                 "--work", str(tmp_path / "work"), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    (case,) = report["cases"]
    assert list(case["engines"]) == ["torch", "llada-onnx"]
    for e in case["engines"].values():
        assert len(e["wall_s_all"]) == 2 and e["wall_s"] > 0 and e["tokens_per_s"] > 0
        assert 0 <= e["host_fraction"] < 1 and e["model_step_ms"] + e["host_step_ms"] > 0 and e["peak_rss_mb"] > 0
        assert e["token_agreement_vs_torch"] == 1.0 and e["speedup_vs_torch"] == e["speedup_vs_best_torch"] > 0
    assert report["memory"][0]["peak_rss_mb"] > 0 and report["memory"][0]["export_mb"] > 0
    assert "| tiny (16M) | 8 / 8 | 1 | llada-onnx fp32 |" in (out / "report.md").read_text()
    assert (out / "tokens_per_s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quantization_bench_smoke(tmp_path, capsys):
    from bench.quantization import main as quantization_main
    from bench.validation_memory import main as validation_memory_main

    out, work = tmp_path / "q", tmp_path / "work"
    assert quantization_main(["--models", "tiny", "--variants", "fp32,fp32-int4-b32-acc4", "--batches", "1",
                              "--reps", "1", "--work", str(work), "--out", str(out)]) == 0
    (model,) = json.loads((out / "report.json").read_text())["models"]
    fp32, int4 = model["variants"]
    assert fp32["agreement_vs_first"] == 1.0 and 0 < int4["agreement_vs_first"] <= 1
    assert int4["size_mb"] < 0.3 * fp32["size_mb"] and int4["load_rss_mb"] > 0 and int4["step_ms"]["1"] > 0
    assert "| tiny | fp32-int4-b32-acc4 |" in (out / "report.md").read_text()
    assert json.loads((Path(int4["export"]) / "llada_onnx.json").read_text())["quantization"]["accuracy_level"] == 4
    capsys.readouterr()
    assert validation_memory_main([int4["export"], fp32["export"]]) == 0
    rows = capsys.readouterr().out.strip().splitlines()[2:]
    assert [r.split("|")[1].strip() for r in rows] == ["pre-packed", "unpacked"]
    assert (out / "quantization.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_step_floor_smoke(tmp_path):
    from bench.step_floor import main as step_floor_main

    from llada_onnx.runtime import default_checkpoint_dir

    out = tmp_path / "floor"
    assert step_floor_main(["--config", str(default_checkpoint_dir() / "config.json"), "--device", "cpu",
                            "--length", "128", "--reps", "2", "--out", str(out)]) == 0
    result = json.loads((out / "report.json").read_text())["result"]
    assert result["length"] == 128 and result["n_layers"] == 6 and result["dtype"] == "float32"
    assert all(result[key] > 0 for key in ("full_forward_ms", "step_products_ms", "dual_step_ms"))
    assert "| step: matrix products only |" in (out / "report.md").read_text()
    assert (out / "step_floor.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cached_attention_forms_agree(tmp_path):
    """The step's attention in its one-op form and its traced form compute the same, and both are timed."""
    from bench.cached_attention import main as cached_attention_main

    from llada_onnx.runtime import default_checkpoint_dir

    out = tmp_path / "attention"
    assert cached_attention_main(["--config", str(default_checkpoint_dir() / "config.json"), "--provider", "cpu",
                                  "--past", "96", "--reps", "2", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["shape"] == {"heads": 4, "head_dim": 64, "layers": 6, "past": 96, "block": 32}
    assert [r["form"] for r in report["results"]] == ["traced", "MultiHeadAttention"]
    assert all(r["ms"] > 0 for r in report["results"])
    assert report["results"][1]["max_abs_diff"] < 1e-5
    assert "| MultiHeadAttention | 0 |" in (out / "report.md").read_text()


def test_block_step_smoke(tmp_path):
    """LLaDA2's block step bench on a small config in the mini layout: the cached step and the full forward for
    torch and the runtime, and the tokens/s columns (the measured rate included)."""
    from bench.block_step import main as block_step_main
    from bench.harness import model_checkpoint

    from llada_onnx.export import export

    config = json.loads((Path(__file__).resolve().parents[1] / "bench/configs/llada2-mini.json").read_text())
    config.update(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_experts=16, n_group=4,
                  topk_group=2, num_experts_per_tok=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  num_hidden_layers=2)
    (tmp_path / "small.json").write_text(json.dumps(config))
    work, out = tmp_path / "work", tmp_path / "step"
    onnx = tmp_path / "onnx"
    export(model_checkpoint("llada2", work, str(tmp_path / "small.json")), onnx, progress=False)
    assert block_step_main(["--config", str(tmp_path / "small.json"), "--work", str(work), "--export", str(onnx),
                            "--provider", "cpu", "--batches", "1", "--compile", "", "--gen", "64", "--warmup", "1",
                            "--reps", "2", "--measure-rate", str(onnx), "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    (result,) = report["results"].values()
    assert {"torch float32 eager step", "torch float32 eager forward", "llada-onnx exact fp32 (onnx) step",
            "llada-onnx exact fp32 (onnx) forward"} == set(result)
    assert all(r["ms"] > 0 for r in result.values()) and report["tokens_per_step"][0] >= 1
    assert "| 1 | llada-onnx exact fp32 (onnx) |" in (out / "report.md").read_text()


def test_kernel_profile_groups_kernels_by_what_they_do():
    from bench.kernel_profile import category, markdown

    seen = {  # kernel names as CUPTI reports them on the H200 (onnxruntime-gpu 1.31, torch 2.11)
        "sm90_xmma_gemm_f16f16_f16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1x1": "matrix products",
        "nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_NNT": "matrix products",
        "cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128_4x1x1_kernel0_0": "attention",
        "void onnxruntime::cuda::_SplitSmallInnerKernel<int4>(...)": "split / concat / slice / copy",
        "void onnxruntime::cuda::_UnaryElementWise<half, float, OP_Cast<half, float>, 4, 4>": "casts",
        "void onnxruntime::contrib::cuda::RotaryEmbeddingBSNH<half>(...)": "rotary",
        "void onnxruntime::contrib::cuda::SkipLayerNormKernelSmall<half, float, half, 256, 8, true>": "norms",
        "triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0": "torch.compile fused (Inductor)",
        "Memcpy HtoD (Pageable -> Device)": "split / concat / slice / copy",
    }
    assert {name: category(name) for name in seen} == seen
    profile = {"calls": 5, "busy_ms": 3.0, "kernels": 12.0,
               "categories": {"matrix products": {"ms": 2.5, "kernels": 8.0}, "casts": {"ms": 0.5, "kernels": 4.0}},
               "top": [{"name": "nvjet_hsh", "category": "matrix products", "ms": 2.5, "kernels": 8.0}]}
    text = markdown({"engine": profile}, {"engine": 3.4})
    assert "| matrix products | 2.50 (8) |" in text and "| no kernel running | 0.40 |" in text


def test_cache_step_compares_exports_in_alternating_rounds(tmp_path, tiny_cache_onnx):
    """Two exports (here one, under two names) timed in one process over two rounds: a row per export, round and
    length, and each export's medians with their ratios to the first's."""
    from bench.cache_step import main as cache_step_main

    (tmp_path / "other").symlink_to(tiny_cache_onnx)
    out = tmp_path / "step"
    assert cache_step_main(["--export", str(tiny_cache_onnx), "--export", str(tmp_path / "other"), "--rounds", "2",
                            "--lengths", "96", "--reps", "2", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    names = [tiny_cache_onnx.name, "other"]
    assert [(r["export"], r["round"]) for r in report["rows"]] == [(names[0], 1), (names[1], 1), (names[1], 2),
                                                                    (names[0], 2)]
    assert [m["export"] for m in report["medians"]] == names and report["medians"][0]["vs_first"]["dual_step_ms"] == 1
    assert all(m["rounds"] == 2 and m["dual_step_ms"] > 0 for m in report["medians"])
    assert "| other | 96 |" in (out / "report.md").read_text()
