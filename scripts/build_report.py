"""Summarize a build log: which backends were built and what ptxas reported for the CUDA kernels,
and the Triton kernels compiled ahead of time for sm_80 / sm_90 with their registers and spills
(``python -m invkernels.triton.aot``, in a process without ``TRITON_INTERPRET``).

Exits non-zero when a CUDA or Triton kernel spills registers or a Triton kernel does not compile.
"""

import os
import re
import subprocess
import sys


def triton_report() -> int:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "invkernels.triton.aot"], env=env, capture_output=True, text=True)
    print(proc.stdout.rstrip())
    if proc.returncode != 0:
        print(proc.stderr.rstrip()[-4000:])
    return proc.returncode


def main(path: str) -> int:
    text = open(path, encoding="utf-8", errors="replace").read()
    for line in text.splitlines():
        if "[invkernels]" in line:
            print(line.strip())
            break
    usage = re.findall(r"ptxas info\s*: Used (\d+) registers", text)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    failed = 0
    if not usage:
        print("CUDA backend: not compiled (no ptxas output in the build log)")
    else:
        spilling = [(s, l) for s, l in spills if int(s) or int(l)]
        example = next(line.strip() for line in text.splitlines() if "spill stores" in line)
        print(f"CUDA backend: {len(usage)} kernel entries compiled by ptxas, max {max(map(int, usage))} registers, "
              f"{len(spilling)} with register spills; e.g. '{example}'")
        failed = 1 if spilling else 0
    return triton_report() or failed


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
