"""Freed batches stay with the process (glibc): checked in a fresh interpreter, whose thresholds are at start-up."""

import platform
import subprocess
import sys

import pytest

_CYCLES = """
import resource, torch
from tracin_func._allocator import keep_freed_batches

def faults_of_batches():  # 32 MB of 8 MB tensors per batch, written and freed, as a batch's activations are
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        batch = [torch.ones(1 << 21) for _ in range(4)]
        del batch
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults_of_batches()  # the first 8 MB block freed sets glibc's threshold to 8 MB: each batch is trimmed after
print(faults_of_batches())
keep_freed_batches()
faults_of_batches()
print(faults_of_batches())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the thresholds are glibc's")
def test_batches_freed_after_keep_freed_batches_are_reused_not_faulted_in_again():
    befores = []
    for _ in range(5):  # a fresh interpreter occasionally keeps its heap anyway (an allocation above the batches)
        out = subprocess.run([sys.executable, "-c", _CYCLES], capture_output=True, text=True, check=True).stdout
        before, after = map(int, out.split())
        assert after < 200
        befores.append(before)
        if before > 10 * 4096:  # every batch's 8192 pages faulted in again (at least half of them)
            return
    raise AssertionError(f"no interpreter faulted its batches in again before the call: {befores}")
