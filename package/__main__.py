"""``python -m llada_onnx``: the ``llada-onnx`` command line."""

import sys

from .cli import main

sys.exit(main())
