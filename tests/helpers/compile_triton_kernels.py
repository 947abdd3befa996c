"""Compile core/triton_kernels.py ahead of time for an H100/H200 (sm_90),
with no GPU: Triton's own ptxas builds the machine code. Prints one JSON
line: {"kernel/modulate/act": [cubin bytes, seconds]}.

Run without TRITON_INTERPRET (the interpreter has no compiler)."""

import json
import sys
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from guided_diffusion_vae.core import triton_kernels

COMMON = {"channels": "i32", "positions": "i32", "groups": "i32", "mod_stride_n": "i32", "mod_stride_c": "i32"}
CONSTANTS = ("BLOCK_C", "BLOCK_P", "MODULATE", "ACT")
SIGNATURES = {
    "forward": {"x_ptr": "*bf16", "w_ptr": "*fp32", "b_ptr": "*fp32", "scale_ptr": "*bf16", "shift_ptr": "*bf16",
                "y_ptr": "*bf16", "mean_ptr": "*fp32", "rstd_ptr": "*fp32", **COMMON, "eps": "fp32"},
    "backward": {"x_ptr": "*bf16", "dy_ptr": "*bf16", "w_ptr": "*fp32", "b_ptr": "*fp32", "scale_ptr": "*bf16",
                 "shift_ptr": "*bf16", "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "dx_ptr": "*bf16",
                 "dw_ptr": "*fp32", "db_ptr": "*fp32", "dscale_ptr": "*fp32", "dshift_ptr": "*fp32", **COMMON},
}


def main():
    target = GPUTarget("cuda", 90, 32)
    built = {}
    for name, signature in SIGNATURES.items():
        for modulate, act in ((True, True), (False, True), (False, False)):
            constants = {"BLOCK_C": 8, "BLOCK_P": 256, "MODULATE": modulate, "ACT": act}
            source = ASTSource(getattr(triton_kernels, name), {**signature, **{k: "constexpr" for k in CONSTANTS}},
                               constants)
            start = time.perf_counter()
            kernel = triton.compile(source, target=target, options={"num_warps": 8})
            built[f"{name}/{modulate}/{act}"] = [len(kernel.asm["cubin"]), time.perf_counter() - start,
                                                 ".target sm_90" in kernel.asm["ptx"]]
    print(json.dumps(built))


if __name__ == "__main__":
    sys.exit(main())
