"""Compile the Triton kernels for sm_90 (no GPU needed) and print, as JSON, which global memory accesses
their PTX contains. Run by tests/test_triton_ptx.py in a separate process, because the kernels must be
compiled, not interpreted (TRITON_INTERPRET must be unset before triton is imported)."""
import collections
import json
import os
import re
import sys

assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET"

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, compile as triton_compile  # noqa: E402

import importlib  # noqa: E402

combine = importlib.import_module("atax_kernels.ops.triton.combine")  # the package's names are functions
gram = importlib.import_module("atax_kernels.ops.triton.gram")

# kernel argument name -> Triton signature type (the runtime passes exactly these)
TYPES = {
    "first_ptr": "*i64", "numels_ptr": "*i64", "ptrs_ptr": "*i64", "qs_ptr": "*i64", "dts_ptr": "*i64",
    "al_ptr": "*i64", "coef_ptr": "*fp64", "part_ptr": "*fp64", "base32": "*fp32", "base16": "*fp16",
    "basebf": "*bf16", "n": "i64", "total": "i64", "K": "i32", "COEF_STRIDE": "i32",
}


def compile_ptx(kernel, constexprs):
    names = kernel.arg_names
    sig = {a: ("constexpr" if a in constexprs else TYPES[a]) for a in names}
    # as at run time: every pointer argument (allocations, the anchor) is specialized as 16-byte aligned
    attrs = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(names) if sig[a].startswith("*")}
    src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton_compile(src, target=GPUTarget("cuda", 90, 32)).asm["ptx"]


def accesses(ptx):
    """Counts of global accesses: ``ld.global.*`` / ``st.global.*`` by PTX opcode, and asynchronous
    global-to-shared copies (software-pipelined loads) by width, as ``cp.async.<bits>bit``."""
    out = collections.Counter()
    for line in ptx.splitlines():
        direct = re.search(r"\b((?:ld|st)\.global[.\w:]*)", line)
        if direct:
            out[direct.group(1)] += 1
        copy = re.search(r"\bcp\.async\.c[ag]\.shared\.global[^,]*,[^,]*, (0x[0-9a-f]+|\d+)", line)
        if copy:
            out[f"cp.async.{int(copy.group(1), 0) * 8}bit"] += 1
    return out


def main():
    report = {}
    for aligned in (True, False):
        for flat in (False, True):
            # aligned=True: the call has aligned tensors, so the 128-bit path is compiled (taken per tensor)
            ptx = compile_ptx(combine.atax_combine_kernel, combine.constexprs(flat, aligned))
            report[f"combine aligned={aligned} flat={flat}"] = accesses(ptx)
            for m in (2, 5, 12):
                ptx = compile_ptx(gram.atax_gram_chunk_kernel, gram.constexprs(m, flat, aligned))
                report[f"gram m={m} aligned={aligned} flat={flat}"] = accesses(ptx)
    json.dump(report, sys.stdout, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
