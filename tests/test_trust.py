"""Trust: export never destroys the user's files, a killed export is cleaned up by the next one, and every bad
input is one line naming the file or flag, exit 2, with nothing half-written (all through the real `llada-onnx`
entry point in a subprocess)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llada_onnx.runtime.manifest import MANIFEST_FILE

ENTRY_POINT = str(Path(sys.executable).with_name("llada-onnx"))


def cli(*args, cwd=None, input=None, env=None):
    return subprocess.run([ENTRY_POINT, *map(str, args)], capture_output=True, text=True, timeout=600, cwd=cwd,
                          input=input, env=env)


def one_line_error(res, *needles):
    """Exit 2, one error line on stderr (after any progress lines) holding every needle, no traceback."""
    assert res.returncode == 2, (res.returncode, res.stderr[-2000:])
    lines = res.stderr.strip().splitlines()
    errors = [line for line in lines if "error:" in line]
    assert errors == lines[-1:] and "Traceback" not in res.stderr, res.stderr[-2000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def workspace(tmp_path, tiny_ckpt):
    """``parent/ckpt`` (a copy of the tiny checkpoint) beside a user file ``parent/notes.txt``."""
    parent = tmp_path / "parent"
    shutil.copytree(tiny_ckpt, parent / "ckpt")
    (parent / "notes.txt").write_text("mine")
    return parent


# ------------------------------------------------------------------------------------------- the output directory
@pytest.mark.parametrize("target", ["ckpt", ".", "ckpt/onnx"])
def test_export_never_writes_over_or_into_its_checkpoint(workspace, target):
    before = digest(workspace)
    for force in ([], ["--force"]):
        res = cli("export", "ckpt", target, *force, cwd=workspace)
        one_line_error(res, "input")
    assert digest(workspace) == before  # nothing deleted, nothing added, no hidden staging folder


def test_export_into_the_working_directory(tmp_path, tiny_ckpt):
    here = tmp_path / "here"
    here.mkdir()
    res = cli("export", tiny_ckpt, ".", "--no-validate", cwd=here)
    assert res.returncode == 0, res.stderr
    assert (here / MANIFEST_FILE).is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["here"]
    (here / "validation.json").write_text("stale")  # replaced in place: the directory itself stays
    inode = here.stat().st_ino
    res = cli("export", tiny_ckpt, ".", "--force", cwd=here)
    assert res.returncode == 0, res.stderr
    assert here.stat().st_ino == inode and json.loads((here / "validation.json").read_text())["finite"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["here"]


def test_force_never_deletes_a_folder_that_is_not_an_export(tmp_path, tiny_ckpt):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    before = digest(mine)
    res = cli("export", tiny_ckpt, ".", "--force", cwd=mine)
    one_line_error(res, "not a llada-onnx export", "thesis.tex", "will not delete")
    assert digest(mine) == before


def test_quantize_never_writes_over_its_source(tmp_path, tiny_onnx):
    source = tmp_path / "exports" / "float"
    shutil.copytree(tiny_onnx, source)
    before = digest(tmp_path)
    for target in (source, source.parent, source / "int4"):
        one_line_error(cli("quantize", source, target, "--quantize", "int4", "--force"), "input")
    assert digest(tmp_path) == before


def test_a_killed_export_is_cleaned_up_by_the_next(tmp_path, tiny_ckpt):
    out = tmp_path / "out"
    proc = subprocess.Popen([ENTRY_POINT, "export", str(tiny_ckpt), str(out)], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    staged = []
    while time.monotonic() < deadline and not any(p.name.endswith(".data") for s in staged for p in s.iterdir()):
        staged = list(tmp_path.glob(".out.partial-*"))
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # as the OOM killer would: no cleanup code runs
    proc.wait()
    assert [p.name.startswith(".out.partial-") for p in tmp_path.iterdir()] == [True]  # hidden, left behind
    res = cli("export", tiny_ckpt, out, "--no-validate")
    assert res.returncode == 0, res.stderr
    assert f"removed {staged[0]} (" in res.stderr and "GB), left behind by an export that was killed" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


# ------------------------------------------------------------------------------------------------ bad checkpoints
def _damage(ckpt: Path, case: str) -> str:
    """Damage the copy ``ckpt`` as ``case`` says; returns what the one-line error must name."""
    weights, config = ckpt / "model.safetensors", ckpt / "config.json"
    raw = json.loads(config.read_text())
    if case == "truncated weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        return "interrupted download"
    if case == "empty weights":
        weights.write_bytes(b"")
        return "model.safetensors is damaged"
    if case == "garbage weights":
        weights.write_bytes(b"<html>not found</html>" * 10)
        return "model.safetensors is damaged"
    if case == "config list":
        config.write_text("[1, 2]")
        return "config.json must hold a JSON object"
    if case == "index list":
        (ckpt / "model.safetensors.index.json").write_text("[]")
        return "model.safetensors.index.json must hold a JSON object"
    field, value = {"n_heads 0": ("n_heads", 0), "n_kv_heads 0": ("n_kv_heads", 0),
                    "max_sequence_length 0": ("max_sequence_length", 0), "d_model abc": ("d_model", "abc"),
                    "mask id out of vocabulary": ("mask_token_id", 10**7)}[case]
    config.write_text(json.dumps(dict(raw, **{field: value})))
    return field


@pytest.mark.parametrize("case", ["truncated weights", "empty weights", "garbage weights", "config list",
                                  "index list", "n_heads 0", "n_kv_heads 0", "max_sequence_length 0",
                                  "d_model abc", "mask id out of vocabulary"])
def test_a_bad_checkpoint_is_one_line(tmp_path, tiny_ckpt, case):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    needle = _damage(ckpt, case)
    one_line_error(cli("export", ckpt, tmp_path / "out"), needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_full_disk_is_one_line(tmp_path, tiny_ckpt):
    """The disk fills up during the export (after the up-front space check): ENOSPC at a real write."""
    script = f"""
import errno, sys
from llada_onnx.export import exporter
def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")
exporter._write_metadata = full
from llada_onnx.cli import main
sys.exit(main(["export", {str(tiny_ckpt)!r}, {str(tmp_path / "out")!r}]))
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    line = one_line_error(res, "is full (No space left on device)", "the export needs about", "GB")
    assert str(tmp_path) in line and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------ bad exports
@pytest.fixture
def export_copy(tmp_path, tiny_cache_onnx):
    """A copy of an export with --cache whose files can be damaged one by one."""
    out = tmp_path / "export"
    shutil.copytree(tiny_cache_onnx, out)
    return out


def _edit_manifest(export: Path, **changes) -> None:
    raw = json.loads((export / MANIFEST_FILE).read_text())
    (export / MANIFEST_FILE).write_text(json.dumps(dict(raw, **changes)))


def _ids(export: Path, **changes) -> dict:
    return dict(json.loads((export / MANIFEST_FILE).read_text())["special_ids"], **changes)


@pytest.mark.parametrize("case", ["tokenizer.json", "tokenizer_config.json", "manifest list", "graph 123",
                                  "chat_template 5", "template syntax", "sizes {}",
                                  "mask id above vocabulary", "negative mask id", "float mask id",
                                  "truncated weights", "missing weights"])
def test_a_bad_export_is_one_line(export_copy, case):
    extra = ["--cache", "dual"] if case == "sizes {}" else []
    needle = {
        "tokenizer.json": "tokenizer.json is damaged", "tokenizer_config.json": "tokenizer_config.json is not valid",
        "manifest list": "must hold a JSON object", "graph 123": "graphs: forward must be the name of a file",
        "chat_template 5": "chat_template must be a string", "template syntax": "chat template has a syntax error",
        "sizes {}": "sizes: required field n_layers", "mask id above vocabulary": "mask_token_id",
        "negative mask id": "mask_token_id must be in [0,", "float mask id": "mask_token_id must be an integer",
        "truncated weights": "damaged or incomplete", "missing weights": "damaged or incomplete",
    }[case]
    if case in ("tokenizer.json", "tokenizer_config.json"):
        (export_copy / case).write_text('{"version": "1.0", "model": ')
    elif case == "manifest list":
        (export_copy / MANIFEST_FILE).write_text("[]")
    elif case == "graph 123":
        _edit_manifest(export_copy, graphs={"forward": 123})
    elif case == "chat_template 5":
        _edit_manifest(export_copy, chat_template=5)
    elif case == "template syntax":
        _edit_manifest(export_copy, chat_template="{% for m in messages %}{{ m.content }")
    elif case == "sizes {}":
        _edit_manifest(export_copy, sizes={})
    elif case == "truncated weights":
        data = export_copy / "model.onnx.data"
        data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    elif case == "missing weights":
        (export_copy / "model.onnx.data").unlink()
    else:
        value = {"mask id above vocabulary": 10**7, "negative mask id": -1, "float mask id": 5.5}[case]
        _edit_manifest(export_copy, special_ids=_ids(export_copy, mask_token_id=value))
    one_line_error(cli("generate", "--model", export_copy, "--prompt", "the king", "--gen-length", "4", *extra),
                   needle)


def test_an_unsupported_operator_is_its_own_message(tmp_path, tiny_onnx):
    """An operator onnxruntime lacks is not reported as a damaged export."""
    import onnx
    from onnx import TensorProto, helper

    from llada_onnx.runtime import Pipeline, UnsupportedGraphError

    export = tmp_path / "export"
    shutil.copytree(tiny_onnx, export)
    io = [helper.make_tensor_value_info(n, TensorProto.INT64, [1, 1]) for n in ("input_ids", "attention_mask")]
    node = helper.make_node("NoSuchKernel", ["input_ids"], ["top_ids"], domain="com.example")
    model = helper.make_model(helper.make_graph([node], "g", io, io[:1]),
                              opset_imports=[helper.make_opsetid("", 20), helper.make_opsetid("com.example", 1)])
    onnx.save(model, str(export / "model.onnx"))
    with pytest.raises(UnsupportedGraphError, match="cannot run model.onnx: .*NoSuchKernel.*newer onnxruntime"):
        Pipeline.from_pretrained(export)


def test_a_provider_whose_libraries_fail_is_its_own_message():
    from llada_onnx.runtime import ProviderUnavailableError
    from llada_onnx.runtime.session import load_error

    error = load_error(Path("model.onnx"), "CUDAExecutionProvider", RuntimeError(
        "Failed to load library libonnxruntime_providers_cuda.so with error: libcublasLt.so.12: cannot open shared "
        "object file"))
    assert isinstance(error, ProviderUnavailableError) and "libcublasLt.so.12" in str(error)
    assert load_error(Path("model.onnx"), "CPUExecutionProvider", RuntimeError("something new")) is None


# ------------------------------------------------------------------------------------------------ prompt files
def test_prompt_files(tmp_path, tiny_onnx):
    one_line_error(cli("generate", "--model", tiny_onnx, "--file", tmp_path), "is a directory")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    one_line_error(cli("generate", "--model", tiny_onnx, "--file", latin), "latin1.txt is not UTF-8",
                   "byte 0xe9 at offset 3")
    bom = tmp_path / "bom.txt"
    bom.write_bytes("\ufeffthe king\n".encode("utf-8"))
    res = cli("generate", "--model", tiny_onnx, "--file", bom, "--raw", "--gen-length", "4", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["results"][0]["prompt"] == "the king"


def test_a_closed_pipe_ends_quietly(tiny_onnx):
    base = f"'{ENTRY_POINT}' generate --model '{tiny_onnx}' --prompt 'the king' --gen-length 4 --json"
    for reader, code in (("head -c 5", (0, 141)), ("true", (141,))):  # `true` never reads: a sure EPIPE
        res = subprocess.run(["bash", "-c", f"{base} | {reader}; exit ${{PIPESTATUS[0]}}"], capture_output=True,
                             text=True, timeout=600)
        assert res.returncode in code and res.stderr == "", (reader, res.returncode, res.stderr)
        assert res.stdout == ('{\n  "' if reader.startswith("head") else "")


def test_a_bug_is_a_traceback_not_a_usage_error(tmp_path, tiny_onnx):
    """Only the package's own errors are one-line usage errors; a RuntimeError from a bug keeps its traceback."""
    script = f"""
import sys
from llada_onnx.runtime import policies
def broken(*args, **kwargs):
    raise RuntimeError("a bug")
policies.transfer_schedule = broken
from llada_onnx.cli import main
sys.exit(main(["generate", "--model", {str(tiny_onnx)!r}, "--prompt", "the king", "--gen-length", "4"]))
"""
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert res.returncode == 1 and "Traceback" in res.stderr and "RuntimeError: a bug" in res.stderr


# ------------------------------------------------------------------------------------------------ quiet logs
def test_library_logs_stay_quiet_unless_verbose(tmp_path, tiny_ckpt):
    """onnxscript's and the quantizer's INFO records (thousands of lines, stack dumps) appear only with --verbose;
    the Python API leaves the root logger as it found it."""
    args = ["export", tiny_ckpt, tmp_path / "cli", "--quantize", "int4", "--cache", "--fusion", "ort"]
    quiet = cli(*args)
    assert quiet.returncode == 0, quiet.stderr
    assert len(quiet.stderr.splitlines()) < 40 and "INFO" not in quiet.stderr and "Stack (most" not in quiet.stderr
    script = f"""
import logging
from llada_onnx.export import Quantization, export
export({str(tiny_ckpt)!r}, {str(tmp_path / "api")!r}, quantization=Quantization("int4"), cache=True,
       fusion="ort", progress=False)
root = logging.getLogger()
assert not root.handlers and root.level == logging.WARNING, (root.handlers, root.level)
"""
    api = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert api.returncode == 0 and api.stderr == "", api.stderr[-3000:]
    # One graph, unvalidated, is enough to show the records (its fusion and quantizer log thousands of lines).
    verbose = cli("export", tiny_ckpt, tmp_path / "verbose", "--quantize", "int4", "--fusion", "ort", "--no-validate",
                  "--verbose")
    assert verbose.returncode == 0 and len(verbose.stderr.splitlines()) > 100


def test_summary_says_when_no_position_was_decisive(tmp_path):
    from llada_onnx.export import ExportResult, summary

    report = {"provider": "CPUExecutionProvider", "dtype": "fp32", "logits_tolerance": None, "logit_scale": 4.0,
              "logits_max_abs_diff": 3.9, "top_ids_agreement": 0.67, "top_ids_decisive_positions": 0,
              "top_ids_decisive_agreement": 1.0, "top_prob_max_abs_diff": 0.37}
    text = summary(ExportResult(tmp_path, {}, report))
    assert "no position was decisive" in text and "100" not in text
