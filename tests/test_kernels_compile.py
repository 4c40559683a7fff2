"""The GPU code path of every kernel compiles for Hopper (sm_90), with no GPU needed.

The interpreter runs kernels as numpy and forgives what the compiler refuses
(loop-carried type changes, bad casts, unsupported shapes), and it never takes
the bf16 tensor-core branch; compiling each kernel's CUDA configuration down to a
cubin with Triton's bundled ptxas catches those here.

Each group compiles in a fresh Python process: in this one the kernels may
already be decorated for the interpreter (tests/kernel_testing.py).
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

BF16 = "*bf16"


def _compile(kernel, pointer_types: dict[str, str], constexprs: dict[str, object]) -> None:
    """Compile with `pointer_types` for the named arguments, i32 for the others, `constexprs` bound."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    params = list(inspect.signature(kernel.fn).parameters)
    signature = {p: "constexpr" if p in constexprs else pointer_types.get(p, "i32") for p in params}
    bound = {(params.index(name),): value for name, value in constexprs.items()}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=bound), target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["cubin"]


def compile_elementwise() -> None:
    from kernels.triton import activation, kv_cache, norm, rope

    _compile(
        norm._rms_norm_kernel,
        {"x_ptr": BF16, "res_ptr": BF16, "w_ptr": BF16, "out_ptr": BF16, "sum_ptr": BF16, "eps": "fp32"},
        {"HAS_RESIDUAL": True, "BLOCK": 4096},
    )
    _compile(
        rope._rope_kernel,
        {"x_ptr": BF16, "out_ptr": BF16, "pos_ptr": "*i64", "inv_freq_ptr": "*fp32", "mscale": "fp32"},
        {"BLOCK_H": 64, "BLOCK_HALF": 32, "BLOCK_D": 64},
    )
    _compile(
        activation._gated_kernel,
        {"x_ptr": BF16, "out_ptr": BF16, "alpha": "fp32", "limit": "fp32"},
        {"INTERLEAVED": True, "BLOCK": 1024},
    )
    _compile(
        kv_cache._write_kv_kernel,
        {"k_ptr": BF16, "v_ptr": BF16, "k_cache_ptr": BF16, "v_cache_ptr": BF16, "slot_ptr": "*i64"},
        {"BLOCK_H": 8, "BLOCK_D": 64},
    )


def compile_attention() -> None:
    for num_splits, block_q, block_m in [(1, 8, 64), (8, 2, 16)]:
        _compile_attention(num_splits, block_q, block_m)


def _compile_attention(num_splits: int, block_q: int, block_m: int) -> None:
    from kernels.triton import attention

    _compile(
        attention._paged_attention_kernel,
        {
            "q_ptr": BF16, "k_cache_ptr": BF16, "v_cache_ptr": BF16, "out_ptr": BF16,
            "part_acc_ptr": "*fp32", "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32",
            "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32", "query_start_loc_ptr": "*i32",
            "sinks_ptr": BF16, "scale_log2": "fp32",
        },
        {
            "GROUP": 8, "BLOCK_Q": block_q, "BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_D": 64, "PAGE": 16,
            "NUM_SPLITS": num_splits, "HAS_WINDOW": True, "HAS_SINKS": True, "UPCAST": False, "PRECISION": "tf32",
        },
    )
    _compile(
        attention._merge_splits_kernel,
        {"part_acc_ptr": "*fp32", "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32", "sinks_ptr": BF16, "out_ptr": BF16},
        {"NUM_SPLITS": 8, "BLOCK_D": 128, "HAS_SINKS": True},
    )


MATMUL_VARIANTS = [  # MoE gate_up (gather + SwiGLU), MoE down (route weight + scatter), dense
    {"SCHEDULED": True, "GATHER_A": True, "SCATTER_OUT": False, "ROUTE_WEIGHT": False, "SWIGLU": True},
    {"SCHEDULED": True, "GATHER_A": False, "SCATTER_OUT": True, "ROUTE_WEIGHT": True, "SWIGLU": False},
    {"SCHEDULED": False, "GATHER_A": False, "SCATTER_OUT": False, "ROUTE_WEIGHT": False, "SWIGLU": False},
]


def compile_matmul() -> None:
    for flags in MATMUL_VARIANTS:
        _compile_matmul(flags, "bf16", (16, 64, 256))
    _compile_matmul(MATMUL_VARIANTS[0], "bf16", (128, 128, 64))  # prefill-sized tiles
    _compile_matmul(MATMUL_VARIANTS[1], "bf16", (16, 32, 256))  # narrow decode tiles
    _compile_matmul(MATMUL_VARIANTS[-1], "fp32", (16, 64, 256))  # the hand-written decode for fp32 activations


def _compile_matmul(flags: dict[str, bool], activations: str, tiles: tuple[int, int, int]) -> None:
    from kernels.triton import mxfp4_matmul

    _compile(
        mxfp4_matmul._matmul_kernel,
        {
            "a_ptr": f"*{activations}", "w_ptr": "*u8", "s_ptr": "*u8", "bias_ptr": BF16, "out_ptr": BF16,
            "a_rows_ptr": "*i32", "out_rows_ptr": "*i32", "route_w_ptr": "*fp32", "tile_expert_ptr": "*i32",
            "tile_start_ptr": "*i32", "expert_end_ptr": "*i32", "alpha": "fp32", "limit": "fp32",
        },
        {**flags, "MXFP4": True, "HAS_BIAS": True, "UPCAST": False,
         "PRECISION": "ieee" if activations == "fp32" else "tf32",
         "DOT_FORMAT": "" if activations == "fp32" else activations,
         "BLOCK_M": tiles[0], "BLOCK_N": tiles[1], "BLOCK_K": tiles[2]},
    )


@pytest.mark.parametrize("group", ["elementwise", "attention", "matmul"])
def test_kernels_compile_for_hopper(group):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, __file__, group], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-4000:]


if __name__ == "__main__":
    {"elementwise": compile_elementwise, "attention": compile_attention, "matmul": compile_matmul}[sys.argv[1]]()
