"""The build report, read from what was built: which backends and CPU capability libraries the
extension holds, the registers and stack frames of every CUDA kernel in the device code of
invkernels._C, and the Triton kernels compiled ahead of time for sm_80 / sm_90 with their
registers and spills (``python -m invkernels.triton.aot``, in a process without
``TRITON_INTERPRET``, its results cached by source hash under build/triton-aot/).

Exits non-zero when a CUDA kernel has a stack frame (local memory: register spills or local
arrays), or a Triton kernel spills registers or does not compile.
"""

from __future__ import annotations

import glob
import os
import struct
import subprocess
import sys
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AOT_CACHE = os.path.join(ROOT, "build", "triton-aot")

_FATBIN_MAGIC = 0xBA55ED50
_FATBIN_ELF = 2
# Attributes of a cubin's .nv.info section (value: symbol index, then the number).
_EIATTR_FRAME_SIZE = 0x11
_EIATTR_REGCOUNT = 0x2F
_EIATTR_FORMAT_SVAL = 4


class DeviceKernel(NamedTuple):
    """One kernel of a cubin: its (mangled) name, the GPU arch, registers and stack frame bytes."""

    name: str
    arch: str
    registers: int
    frame_bytes: int


def _sections(elf: bytes) -> dict[str, tuple[int, int, int]]:
    """An ELF64 file's sections: name -> (offset, size, sh_info)."""
    shoff, = struct.unpack_from("<Q", elf, 0x28)
    entsize, count, names_index = struct.unpack_from("<HHH", elf, 0x3A)
    raw = [struct.unpack_from("<IIQQQQIIQQ", elf, shoff + i * entsize) for i in range(count)]
    names_offset = raw[names_index][4]
    out = {}
    for name, _type, _flags, _addr, offset, size, _link, info, _align, _entsize in raw:
        start = names_offset + name
        out[elf[start:elf.index(b"\0", start)].decode()] = (offset, size, info)
    return out


def _cubins(library: bytes):
    """``(arch, cubin bytes)`` of every device ELF in the library's .nv_fatbin section."""
    offset, size, _ = _sections(library)[".nv_fatbin"]
    blob = library[offset:offset + size]
    pos = 0
    while pos + 16 <= len(blob):
        magic, _version, header_size, body_size = struct.unpack_from("<IHHQ", blob, pos)
        if magic != _FATBIN_MAGIC:
            break
        entry, end = pos + header_size, pos + header_size + body_size
        while entry < end:
            kind, _, entry_header, payload = struct.unpack_from("<HHIQ", blob, entry)
            arch, = struct.unpack_from("<I", blob, entry + 28)
            data = blob[entry + entry_header:entry + entry_header + payload]
            if kind == _FATBIN_ELF and data[:4] == b"\x7fELF":
                yield f"sm_{arch}", data
            entry += entry_header + payload
        pos = end


def _kernel_attributes(cubin: bytes, sections: dict) -> dict[int, dict[str, int]]:
    """EIATTR_FRAME_SIZE and EIATTR_REGCOUNT of the cubin's .nv.info: attribute -> kernel -> value."""
    if ".nv.info" not in sections or ".symtab" not in sections:
        return {_EIATTR_FRAME_SIZE: {}, _EIATTR_REGCOUNT: {}}
    sym_offset, sym_size, _ = sections[".symtab"]
    str_offset = sections[".strtab"][0]

    def symbol(index: int) -> str:
        name, = struct.unpack_from("<I", cubin, sym_offset + 24 * index)
        start = str_offset + name
        return cubin[start:cubin.index(b"\0", start)].decode()

    offset, size, _ = sections[".nv.info"]
    found: dict[int, dict[str, int]] = {_EIATTR_FRAME_SIZE: {}, _EIATTR_REGCOUNT: {}}
    pos = offset
    while pos < offset + size:
        fmt, attr = cubin[pos], cubin[pos + 1]
        if fmt != _EIATTR_FORMAT_SVAL:
            pos += 4 if fmt in (2, 3) else 2
            continue
        length, = struct.unpack_from("<H", cubin, pos + 2)
        if attr in found and length == 8:
            index, value = struct.unpack_from("<II", cubin, pos + 4)
            if index * 24 < sym_size:
                found[attr][symbol(index)] = value
        pos += 4 + length
    return found


def device_kernels(path: str) -> list[DeviceKernel]:
    """Every kernel of every cubin in the shared library ``path`` (no CUDA tools needed): its
    registers and stack frame, as the cubin's .nv.info records them for the driver."""
    with open(path, "rb") as f:
        library = f.read()
    if ".nv_fatbin" not in _sections(library):
        return []
    kernels = []
    for arch, cubin in _cubins(library):
        sections = _sections(cubin)
        attributes = _kernel_attributes(cubin, sections)
        for name in sections:
            if name.startswith(".text."):
                kernel = name[len(".text."):]
                kernels.append(DeviceKernel(kernel, arch, attributes[_EIATTR_REGCOUNT].get(kernel, 0),
                                            attributes[_EIATTR_FRAME_SIZE].get(kernel, 0)))
    return kernels


def cuda_report() -> int:
    libraries = glob.glob(os.path.join(ROOT, "invkernels", "_C.*.so"))
    if not libraries:
        print("CUDA backend: invkernels._C is not built")
        return 1
    kernels = device_kernels(libraries[0])
    if not kernels:
        print(f"CUDA backend: not compiled ({os.path.basename(libraries[0])} holds no device code)")
        return 0
    archs = sorted({k.arch for k in kernels})
    framed = [k for k in kernels if k.frame_bytes]
    print(f"CUDA backend: {len(kernels)} kernel entries for {'/'.join(archs)} in {os.path.basename(libraries[0])}, "
          f"max {max(k.registers for k in kernels)} registers, {len(framed)} with a stack frame")
    for k in framed:
        print(f"  stack frame (spills or local arrays): {k.name} on {k.arch}: {k.frame_bytes} bytes")
    return 1 if framed else 0


def backends_report() -> None:
    import invkernels  # noqa: PLC0415

    info = invkernels.build_info()
    cpu_libraries = sorted(os.path.basename(p).split(".")[0] for p in glob.glob(os.path.join(ROOT, "invkernels",
                                                                                              "_cpu_*.so")))
    print(f"[invkernels] torch {info['torch_version']}; CPU kernels: {', '.join(cpu_libraries)} "
          f"(this CPU: {info['cpu_capability']}); CUDA backend: "
          + (f"yes, archs {info['cuda_archs']}" if info["cuda"] else "no"))


def triton_report() -> int:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "invkernels.triton.aot", "--cache", AOT_CACHE], env=env,
                          capture_output=True, text=True, cwd=ROOT)
    print(proc.stdout.rstrip())
    if proc.returncode != 0:
        print(proc.stderr.rstrip()[-4000:])
    return proc.returncode


def main() -> int:
    backends_report()
    failed = cuda_report()
    return triton_report() or failed


if __name__ == "__main__":
    sys.exit(main())
