"""Summarize a build log: which backends were built and what ptxas reported for the CUDA kernels.

Exits non-zero when a CUDA kernel spills registers.
"""

import re
import sys


def main(path: str) -> int:
    text = open(path, encoding="utf-8", errors="replace").read()
    for line in text.splitlines():
        if "[invkernels]" in line:
            print(line.strip())
            break
    usage = re.findall(r"ptxas info\s*: Used (\d+) registers", text)
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if not usage:
        print("CUDA backend: not compiled (no ptxas output in the build log)")
        return 0
    spilling = [(s, l) for s, l in spills if int(s) or int(l)]
    example = next(line.strip() for line in text.splitlines() if "spill stores" in line)
    print(f"CUDA backend: {len(usage)} kernel entries compiled by ptxas, max {max(map(int, usage))} registers, "
          f"{len(spilling)} with register spills; e.g. '{example}'")
    return 1 if spilling else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
