"""Stage: the tests that need CUDA (``tests/gpu``, marked ``cuda``): bf16 autocast, fused AdamW,
SDPA's fused kernels, gradient checkpointing, ``torch.compile``, NCCL process-group and DDP
initialisation, JPEG decoding on the device. On a CPU they are collected and skipped, which is
what --quick checks. Figures: tests collected, passed, failed, skipped, and the suite's seconds;
every test's outcome (and failure message) is recorded. pytest runs in this process, so a test
that hangs is ended by run.py's cap on the stage.
"""

from __future__ import annotations

import os
import time
import xml.etree.ElementTree as ET

from stagelib import ROOT, run_stage, stage_args


def outcomes(junit: str) -> list[dict]:
    cases = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        outcome, message = "passed", None
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = (el.get("message") or el.text or "")[:1500]
                break
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": float(case.get("time") or 0), "message": message})
    return cases


def main(args, result: dict) -> None:
    import pytest

    junit = str(args.out.with_suffix(".junit.xml"))
    argv = ["tests/gpu", "-m", "cuda", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", "-o", "addopts=",
            "--durations=0"]
    os.chdir(ROOT)
    t0 = time.perf_counter()
    # In this process: torch is imported already, and run.py's cap still bounds a hung test.
    code = int(pytest.main(argv))
    seconds = time.perf_counter() - t0
    cases = outcomes(junit)
    count = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "error", "skipped")}
    result.update(command="pytest " + " ".join(argv), tests=cases, exit_code=code)
    result["figures"] = {"collected": len(cases), **count, "pytest_seconds": round(seconds, 2)}
    if not cases:
        raise RuntimeError(f"no tests collected (pytest exited {code})")
    bad = [c["test"] for c in cases if c["outcome"] in ("failed", "error")]
    if bad:
        raise RuntimeError(f"{len(bad)} of {len(cases)} CUDA tests failed: {', '.join(bad)}")
    if code not in (0, 5):  # 5: everything deselected; anything else is pytest's own failure
        raise RuntimeError(f"pytest exited {code}")


if __name__ == "__main__":
    run_stage(main, stage_args(__doc__))
