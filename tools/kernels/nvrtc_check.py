#!/usr/bin/env python3
"""Compile crates/sgp-kernels/kernels/masked_attention.cu without nvcc or a GPU.

Uses NVRTC (CUDA C++ -> PTX) and nvJitLink (PTX -> SASS, i.e. what ptxas does) from the
`nvidia-cuda-nvrtc-cu12` / `nvidia-nvjitlink-cu12` wheels (pulled in by PyTorch's CUDA
builds), via ctypes. It catches compile errors and prints each kernel's register,
spill and shared-memory use for the chosen architectures. It does not run anything:
numerical checks need a GPU (tools/kernels/cuda_check.sh).

    python tools/kernels/nvrtc_check.py [--arch 80 --arch 90] [--ptx-out out.ptx]
"""

import argparse
import ctypes
import glob
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SRC = os.path.join(ROOT, "crates", "sgp-kernels", "kernels", "masked_attention.cu")


def find_lib(pattern):
    roots = [os.path.dirname(os.path.dirname(os.__file__))] + sys.path
    for root in roots:
        hits = glob.glob(os.path.join(root, "**", pattern), recursive=True)
        if hits:
            return sorted(hits)[0]
    raise SystemExit(f"cannot find {pattern}; pip install nvidia-cuda-nvrtc-cu12 nvidia-nvjitlink-cu12")


def nvrtc_compile(lib, src, arch):
    prog = ctypes.c_void_p()
    check = lambda rc, what: rc == 0 or sys.exit(f"{what} failed: {lib.nvrtcGetErrorString(rc).decode()}")
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    check(lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"masked_attention.cu", 0, None, None), "create")
    opts = [f"--gpu-architecture=compute_{arch}".encode(), b"-std=c++17", b"-lineinfo"]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    rc = lib.nvrtcCompileProgram(prog, len(opts), arr)
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    if log.value.strip():
        print(log.value.decode())
    check(rc, f"compile (compute_{arch})")
    lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetPTX(prog, ptx)
    return ptx.value


def jitlink(lib, ptx, arch):
    handle = ctypes.c_void_p()
    opts = [f"-arch=sm_{arch}".encode(), b"-verbose", b"-O3"]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    rc = lib.nvJitLinkCreate(ctypes.byref(handle), len(opts), arr)
    if rc != 0:
        sys.exit(f"nvJitLinkCreate failed: {rc}")
    rc = lib.nvJitLinkAddData(handle, 2, ptx, len(ptx), b"masked_attention.ptx")  # 2 = NVJITLINK_INPUT_PTX
    rc2 = lib.nvJitLinkComplete(handle) if rc == 0 else rc
    for getter in ("InfoLog", "ErrorLog"):
        size = ctypes.c_size_t()
        getattr(lib, f"nvJitLinkGet{getter}Size")(handle, ctypes.byref(size))
        buf = ctypes.create_string_buffer(size.value + 1)
        getattr(lib, f"nvJitLinkGet{getter}")(handle, buf)
        text = buf.value.decode().strip()
        if text:
            print(f"--- nvJitLink {getter} (sm_{arch}) ---\n{text}")
    if rc2 != 0:
        sys.exit(f"nvJitLink failed for sm_{arch}: {rc2}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", action="append", default=None, help="compute capability, e.g. 90")
    ap.add_argument("--ptx-out", default=None)
    args = ap.parse_args()
    archs = args.arch or ["80", "90"]
    nvrtc = ctypes.CDLL(find_lib("libnvrtc.so.12"))
    jl = ctypes.CDLL(find_lib("libnvJitLink.so.12"))
    src = open(SRC).read()
    for arch in archs:
        ptx = nvrtc_compile(nvrtc, src, arch)
        kernels = [l.split()[-1].rstrip("(") for l in ptx.decode().splitlines() if l.startswith(".visible .entry")]
        print(f"compute_{arch}: PTX {len(ptx)} bytes, {len(kernels)} kernels: {', '.join(kernels)}")
        if args.ptx_out:
            with open(args.ptx_out, "wb") as f:
                f.write(ptx)
        jitlink(jl, ptx, arch)
    print("OK")


if __name__ == "__main__":
    main()
