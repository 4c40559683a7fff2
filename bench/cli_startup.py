"""CLI start-up benchmark: wall time from process start to exit of the tool commands.

`minerva inspect` on a gpt-oss-20b-shaped GGUF (459 tensors, a sparse file from bench/loader.py),
`minerva models` and `minerva --version`, each run as a fresh process N times; beside them the
floor (`python -c pass`) and what the same process paid when the loader imported torch (`python -c
"import torch"`) or FastAPI. Prints a table of medians and writes JSON (device, commit, settings) to
bench/results/cli-startup-<device>.json.

    .venv/bin/python -m bench.cli_startup [--repeats 15] [--workdir /tmp/minerva-bench-loader]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.loader import device_name, save_result, write_sparse_gguf

REPO = Path(__file__).resolve().parents[1]


def wall_ms(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/minerva-bench-loader"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    gguf_path = args.workdir / "gpt-oss-20b.gguf"
    if not gguf_path.exists():
        write_sparse_gguf(gguf_path, with_vocab=False)
    minerva = [sys.executable, "-m", "server.cli"]
    rows = {
        "python -c pass (floor)": [sys.executable, "-c", "pass"],
        "minerva --version": [*minerva, "--version"],
        "minerva models": [*minerva, "models"],
        "minerva inspect (459-tensor GGUF)": [*minerva, "inspect", str(gguf_path)],
        "python -c 'import torch'": [sys.executable, "-c", "import torch"],
        "python -c 'import fastapi'": [sys.executable, "-c", "import fastapi"],
    }
    results: dict[str, dict[str, Any]] = {label: {"command": command, "ms": []} for label, command in rows.items()}
    for _ in range(args.repeats):  # interleaved, so a busy moment on a shared machine hits every row alike
        for label, command in rows.items():
            results[label]["ms"].append(wall_ms(command))
    width = max(map(len, results))
    print(f"{'command':<{width}}  {'median ms':>9}  {'min ms':>7}")
    for label, row in results.items():
        row["median_ms"], row["min_ms"] = statistics.median(row["ms"]), min(row["ms"])
        print(f"{label:<{width}}  {row['median_ms']:9.1f}  {row['min_ms']:7.1f}")
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    device = device_name()
    record = {"benchmark": "cli.startup (process wall time)", "device": device, "commit": commit,
              "settings": {"repeats": args.repeats, "gguf": "gpt-oss-20b-shaped, 459 tensors, no vocabulary"},
              "results": results}
    save_result("cli-startup", device, record)


if __name__ == "__main__":
    main()
