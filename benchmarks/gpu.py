"""The GPU benchmarks in one go, for a lent device: minutes of device time, no set-up, one results file.

  1. reconstruct at real architecture: ``bench_reconstruct.py --sd15-random`` (SD v1.5 UNet / VAE / text encoder, BLIP
     base, open_clip ViT-B/32; random weights, 512 px) in fp16 at batch 8, ``Reconstructor`` against the bare
     transformers + diffusers + open_clip calls in the same process, interleaved: the overhead ratio;
  2. the joint finetuning step at 512 px: ``bench_finetune.py --real-arch`` (each configuration with gradient
     checkpointing off and on, in a fresh process: CUDA peak memory above the loaded models, step seconds), at each
     batch size of ``--train-batches``.

Everything runs offline (random weights built locally; the finetune models are saved once under
``$RECON_CACHE/bench-real-arch-v1``, a minute on the first run). The results (environment, each command, its exit
status, its output and its JSON lines parsed) go to one JSON file, ``$OUT/gpu-results.json`` when ``$OUT`` is set
(the device runner brings that folder back), else ``benchmarks/gpu-results.json``. Without CUDA it stops before
doing anything, exit status 2; ``--dry-run`` prints the plan and checks that the scripts take its flags, no GPU
needed.

    python benchmarks/gpu.py                  # on the GPU machine, in the repository root (~6-10 min on one H200)
    python benchmarks/gpu.py --dry-run        # anywhere
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def plan(args) -> list[dict]:
    """The benchmark commands, each ``{name, argv, timeout_s}``."""
    py = sys.executable
    steps = [
        {
            "name": "reconstruct_sd15_fp16_batch8",
            "argv": [
                py,
                str(HERE / "bench_reconstruct.py"),
                "--sd15-random",
                "--device",
                "cuda",
                "--dtype",
                "fp16",
                "--batches",
                "8",
                "--n",
                str(args.n),
                "--repeats",
                str(args.repeats),
                "--steps",
                str(args.steps),
                "--no-cache-bench",
            ],
            "timeout_s": 600,
        }
    ]
    for b in args.train_batches:
        steps.append(
            {
                "name": f"joint_step_memory_512px_batch{b}",
                "argv": [
                    py,
                    str(HERE / "bench_finetune.py"),
                    "--real-arch",
                    "--device",
                    "cuda",
                    "--batch-size",
                    str(b),
                    "--steps",
                    "3",
                    "--warmup",
                    "1",
                ],
                "timeout_s": 900,
            }
        )
    return steps


def check_flags(steps: list[dict]) -> list[str]:
    """Flags a step passes that its script does not define (read from its source: no import, no GPU)."""
    problems = []
    for step in steps:
        script = Path(step["argv"][1])
        if not script.is_file():
            problems.append(f"{step['name']}: {script} is missing")
            continue
        defined = set(re.findall(r"add_argument\(\s*\"(--[a-z0-9-]+)\"", script.read_text(encoding="utf-8")))
        problems += [
            f"{step['name']}: {script.name} has no {flag}"
            for flag in step["argv"][2:]
            if flag.startswith("--") and flag not in defined
        ]
    return problems


def environment() -> dict:
    import torch

    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "host": platform.node(),
        "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
        env["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    for name in ("diffusers", "transformers", "open_clip"):
        try:
            env[name] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001  (a version is context, not a requirement here)
            env[name] = f"unavailable: {e}"
    try:
        env["commit"] = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE, timeout=10
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    return env


def run_step(step: dict) -> dict:
    t0 = time.perf_counter()
    try:
        r = subprocess.run(
            step["argv"], capture_output=True, text=True, timeout=step["timeout_s"], cwd=HERE.parent
        )
        rc, out, err = r.returncode, r.stdout, r.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = "timeout", e.stdout or "", e.stderr or ""
        out, err = (x.decode(errors="replace") if isinstance(x, bytes) else x for x in (out, err))
    parsed = []
    for line in out.splitlines():
        if line.startswith("{"):
            try:
                parsed.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return {
        "name": step["name"],
        "argv": step["argv"][1:],
        "rc": rc,
        "wall_s": round(time.perf_counter() - t0, 1),
        "json": parsed,
        "stdout": out[-20_000:],
        "stderr_tail": err[-4_000:],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--dry-run", action="store_true", help="print the plan and check the flags; no GPU needed"
    )
    ap.add_argument(
        "--out", default=None, help="results file (default: $OUT/gpu-results.json, else benchmarks/)"
    )
    ap.add_argument("--n", type=int, default=16, help="images per reconstruct measurement (two batches of 8)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20, help="denoising steps per image")
    ap.add_argument(
        "--train-batches",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 4],
        help="batch sizes of the joint-step memory table, e.g. 1,4",
    )
    args = ap.parse_args(argv)
    steps = plan(args)
    out = Path(
        args.out
        or (
            Path(os.environ["OUT"]) / "gpu-results.json"
            if os.environ.get("OUT")
            else HERE / "gpu-results.json"
        )
    )
    problems = check_flags(steps)
    if args.dry_run:
        for step in steps:
            print(f"{step['name']} (timeout {step['timeout_s']} s):\n  {' '.join(step['argv'])}")
        print(f"results: {out}")
        for p in problems:
            print(f"gpu.py: {p}", file=sys.stderr)
        return 1 if problems else 0
    if problems:
        print("gpu.py: " + "; ".join(problems), file=sys.stderr)
        return 1
    import torch

    if not torch.cuda.is_available():
        print(
            "gpu.py: no CUDA device (torch.cuda.is_available() is False): run this on the GPU machine, or "
            "`python benchmarks/gpu.py --dry-run` to check the plan here",
            file=sys.stderr,
        )
        return 2
    results = {"environment": environment(), "steps": []}
    for step in steps:
        print(f"gpu.py: {step['name']} ...", file=sys.stderr, flush=True)
        results["steps"].append(run_step(step))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1) + "\n")  # after every step: a timeout keeps what is done
        last = results["steps"][-1]
        print(f"gpu.py: {step['name']}: rc {last['rc']}, {last['wall_s']} s", file=sys.stderr, flush=True)
    print(out)
    return 0 if all(s["rc"] == 0 for s in results["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
