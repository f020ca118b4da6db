"""train.runtime.reuse_freed_memory: freed tensors' pages come back without new page faults."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# Run in a child process: the setting is process-wide and lasts, and the test process must keep
# glibc's defaults for everything else.
_CHILD = textwrap.dedent("""
    import json, resource, sys, torch
    from clipforge.train.runtime import reuse_freed_memory

    def faults_per_allocation():
        out = []
        for _ in range(16):  # three 24 MiB activations allocated, written and freed, as in a training step
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            ts = [torch.empty(6 << 20) for _ in range(3)]
            for t in ts:
                t.fill_(1.0)
            del ts
            out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        return out

    applied = reuse_freed_memory()
    print(json.dumps({"applied": applied, "faults": faults_per_allocation()}))
""")


def _run() -> dict:
    import json

    done = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_without_page_faults():
    got = _run()
    if not got["applied"]:
        pytest.skip("this C library has no mallopt (not glibc)")
    # 18,432 pages when freshly mapped; the heap settles within a few rounds and the pages then
    # stay mapped. (glibc's default is erratic here: some runs settle, others fault 12k pages
    # every other round for good, so there is no stable control to compare with.)
    assert sum(got["faults"][8:]) < 100, got["faults"]
