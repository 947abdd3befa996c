"""Compile core/triton_kernels.py ahead of time for an H100/H200 (sm_90),
with no GPU: Triton's own ptxas builds the machine code. Prints one JSON
line: {"kernel/modulate/act": [cubin bytes, seconds, built for sm_90]}:
the NCHW kernels in their three uses, the channels-last ones in the
ResBlock's (scale-shift and SiLU); the forward kernels also with a folded
input bias ("/input_bias"), and the biased residual add in either layout.

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
CONSTANTS_LAST = ("BLOCK_CH", "BLOCK_P", "BLOCK_G", "MODULATE", "ACT")
SIGNATURES = {
    "forward": {"x_ptr": "*bf16", "w_ptr": "*fp32", "b_ptr": "*fp32", "scale_ptr": "*bf16", "shift_ptr": "*bf16",
                "ib_ptr": "*bf16", "y_ptr": "*bf16", "mean_ptr": "*fp32", "rstd_ptr": "*fp32", **COMMON, "eps": "fp32"},
    "backward": {"x_ptr": "*bf16", "dy_ptr": "*bf16", "w_ptr": "*fp32", "b_ptr": "*fp32", "scale_ptr": "*bf16",
                 "shift_ptr": "*bf16", "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "dx_ptr": "*bf16",
                 "dw_ptr": "*fp32", "db_ptr": "*fp32", "dscale_ptr": "*fp32", "dshift_ptr": "*fp32", **COMMON},
}


def _channels_last(signature):
    """The channels-last kernel's signature: groups_per_program follows groups."""
    out = {}
    for key, kind in signature.items():
        out[key] = kind
        if key == "groups":
            out["groups_per_program"] = "i32"
    return out


RESIDUAL = {"skip_ptr": "*fp32", "h_ptr": "*bf16", "b_ptr": "*bf16", "out_ptr": "*fp32", "total": "i64",
            "channels": "i32", "positions": "i32"}


def _build(name, signature, constants, target):
    names = tuple(constants) if name == "biased_residual" else CONSTANTS_LAST if name.endswith("_last") else CONSTANTS
    if name.startswith("forward"):
        names += ("INPUT_BIAS",)
    source = ASTSource(getattr(triton_kernels, name), {**signature, **{k: "constexpr" for k in names}}, constants)
    start = time.perf_counter()
    kernel = triton.compile(source, target=target, options={"num_warps": 8})
    return [len(kernel.asm["cubin"]), time.perf_counter() - start, ".target sm_90" in kernel.asm["ptx"]]


def main():
    target = GPUTarget("cuda", 90, 32)
    built = {}
    for name, signature in SIGNATURES.items():
        forward = {"INPUT_BIAS": False} if name == "forward" else {}
        for modulate, act in ((True, True), (False, True), (False, False)):
            constants = {"BLOCK_C": 8, "BLOCK_P": 256, "MODULATE": modulate, "ACT": act, **forward}
            built[f"{name}/{modulate}/{act}"] = _build(name, signature, constants, target)
        # channels-last, as latent16's 128-channel ResBlocks launch it
        constants = {"BLOCK_CH": 64, "BLOCK_P": 32, "BLOCK_G": 16, "MODULATE": True, "ACT": True, **forward}
        built[f"{name}_last/True/True"] = _build(f"{name}_last", _channels_last(signature), constants, target)
    # sampling: the out norm with the convolution's bias folded in
    constants = {"BLOCK_C": 8, "BLOCK_P": 256, "MODULATE": True, "ACT": True, "INPUT_BIAS": True}
    built["forward/True/True/input_bias"] = _build("forward", SIGNATURES["forward"], constants, target)
    constants = {"BLOCK_CH": 64, "BLOCK_P": 32, "BLOCK_G": 16, "MODULATE": True, "ACT": True, "INPUT_BIAS": True}
    built["forward_last/True/True/input_bias"] = _build("forward_last", _channels_last(SIGNATURES["forward"]),
                                                        constants, target)
    for last in (False, True):
        constants = {"CHANNELS_LAST": last, "BLOCK": 1024}
        built[f"biased_residual/{'last' if last else 'nchw'}"] = _build("biased_residual", RESIDUAL, constants, target)
    print(json.dumps(built))


if __name__ == "__main__":
    sys.exit(main())
