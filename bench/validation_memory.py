"""The memory ``llada-onnx quantize`` spends validating: the float graph opened unpacked (as validation opens it)
against pre-packed (onnxruntime's default), each in a fresh process.

    python -m bench.validation_memory QUANTIZED_EXPORT FLOAT_EXPORT

onnxruntime maps an export's weight file and reads it in place; a kernel that pre-packs a weight copies it into
process memory. Mapped pages are page cache the system can drop, copies are not: so the figure that counts is the
process's anonymous memory (``RssAnon``, sampled every 50 ms), printed beside the resident size and the time.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import threading
import time


def measure(quantized: str, reference: str, packed: bool) -> str:
    import onnxruntime as ort

    from llada_onnx.export.validate import validate_against_float

    if packed:  # onnxruntime's default: the option that turns pre-packing off is dropped
        add = ort.SessionOptions.add_session_config_entry
        ort.SessionOptions.add_session_config_entry = (
            lambda self, key, value: None if key == "session.disable_prepacking" else add(self, key, value))
    peak = {"RssAnon": 0, "VmRSS": 0}

    def sample():
        while True:
            status = open("/proc/self/status").read()
            for key in peak:
                peak[key] = max(peak[key], int(re.search(key + r":\s+(\d+)", status).group(1)))
            time.sleep(0.05)

    threading.Thread(target=sample, daemon=True).start()
    start = time.perf_counter()
    validate_against_float(quantized, reference)
    return (f"| {'pre-packed' if packed else 'unpacked'} | {peak['RssAnon'] / 1024:,.0f} | {peak['VmRSS'] / 1024:,.0f} "
            f"| {time.perf_counter() - start:.1f} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.validation_memory", description=__doc__.split("\n")[0])
    p.add_argument("quantized")
    p.add_argument("reference", help="the float export it was quantized from")
    p.add_argument("--packed", action=argparse.BooleanOptionalAction, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.packed is not None:  # one measurement, in this fresh process
        print(measure(a.quantized, a.reference, a.packed))
        return 0
    print("| float graph | peak anonymous MB | peak RSS MB | seconds |\n| --- | --- | --- | --- |")
    for flag in ("--packed", "--no-packed"):
        out = subprocess.run([sys.executable, "-m", "bench.validation_memory", a.quantized, a.reference, flag],
                             capture_output=True, text=True, check=True).stdout
        print(out.strip().splitlines()[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
