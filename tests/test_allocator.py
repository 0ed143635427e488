"""The allocator setting featurize makes: freed buffers stay in the process, so a loop
of large allocations stops page-faulting them in again. Each case runs in its own
interpreter (the setting lasts for the life of a process)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# Allocates and frees a 64 MB tensor 20 times, writing every page, and prints the minor
# page faults those rounds took (after one warm-up round) and what keep_freed_memory said.
# (torch, not numpy: numpy asks for huge pages, which hides the cost.)
ROUNDS = """
import resource, sys
import torch
from components.io.allocator import keep_freed_memory
torch.set_num_threads(1)
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
torch.ones(16 << 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    torch.ones(16 << 20).sum()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, kept)
"""


def _faults(mode: str, **env: str) -> tuple[int, str]:
    environ = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"} | env
    done = subprocess.run(
        [sys.executable, "-c", ROUNDS, mode], capture_output=True, text=True, env=environ
    )
    assert done.returncode == 0, done.stderr
    faults, kept = done.stdout.split()
    return int(faults), kept


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_freed_buffers_are_reused_instead_of_faulted_in_again():
    system, _ = _faults("system")
    kept, said = _faults("keep")

    assert said == "True"
    # 20 rounds x 16,384 pages each with the system's default; a few rounds' worth when
    # kept (the kernel may still reclaim idle pages)
    assert system > 20 * 16_000
    assert kept < system / 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_an_operators_malloc_tunables_are_left_alone():
    faults, said = _faults("keep", GLIBC_TUNABLES="glibc.malloc.tcache_count=7")

    assert said == "False"
    assert faults > 20 * 16_000
