"""The GPU code path of every kernel compiles for Hopper (sm_90), with no GPU needed.

The interpreter runs kernels as numpy and forgives what the compiler refuses
(loop-carried type changes, bad casts, unsupported shapes), and it never takes
the bf16 tensor-core branch; compiling each kernel's CUDA configuration down to a
cubin with Triton's bundled ptxas catches those here. Arguments are specialized as a
launch specializes them (Triton's own rule): every pointer as 16-byte aligned (torch
allocates so, and every launch passes whole tensors or 16-byte-aligned views) and the
integers given with their gpt-oss-20b values (multiples of 16 marked so, 1 made a
constant); without that, loads cannot be vectorized or pipelined and the figures
describe code the GPU never runs. Each cubin's resource use
(registers per thread, shared memory, local memory = spills) is read back with
Triton's bundled cuobjdump: the gpt-oss-20b decode configurations must not spill.
`python tests/test_kernels_compile.py figures` prints them as the table in docs/kernels.md.

Each group compiles in a fresh Python process: in this one the kernels may
already be decorated for the interpreter (tests/kernel_testing.py).
"""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from kernels.mxfp4 import TILE_K

BF16 = "*bf16"
# Hopper's shared memory per block (opt-in maximum).
SMEM_LIMIT = 227 * 1024


def _compile(
    kernel, pointer_types: dict[str, str], constexprs: dict[str, object], num_warps: int = 4, num_stages: int = 3,
    ints: dict[str, int] | None = None,
) -> dict:
    """Compile with `pointer_types` for the named arguments (pointers 16-byte aligned), `ints` specialized
    on their values as a launch would, i32 for the other arguments, `constexprs` bound; returns the
    cubin's resource use."""
    import triton
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend, GPUTarget
    from triton.compiler import ASTSource

    params = list(inspect.signature(kernel.fn).parameters)
    constexprs, signature, attrs = dict(constexprs), {}, {}
    for p in params:
        if p in (ints or {}):
            kind, key = native_specialize_impl(BaseBackend, ints[p], False, True, True)
            if kind == "constexpr":
                constexprs[p] = key
            else:
                signature[p] = kind
                attrs[(params.index(p),)] = BaseBackend.parse_attr(key)
        elif p not in constexprs:
            signature[p] = pointer_types.get(p, "i32")
            if signature[p].startswith("*"):
                attrs[(params.index(p),)] = BaseBackend.parse_attr("D")
    signature = {p: "constexpr" if p in constexprs else signature[p] for p in params}
    bound = {(params.index(name),): value for name, value in constexprs.items()}
    compiled = triton.compile(
        ASTSource(fn=kernel, signature=signature, constexprs=bound, attrs=attrs), target=GPUTarget("cuda", 90, 32),
        options={"num_warps": num_warps, "num_stages": num_stages},
    )
    assert compiled.asm["cubin"]
    return _resources(compiled, num_warps, num_stages)


def _resources(compiled, num_warps: int, num_stages: int) -> dict:
    """Registers, static + dynamic shared memory and local (spill) bytes of a compiled kernel."""
    import triton

    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True, check=True)
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage.stdout))
    return {
        "registers": int(fields["REG"]),
        "shared_bytes": int(fields["SHARED"]) + compiled.metadata.shared,
        "spill_bytes": int(fields["LOCAL"]) + int(fields["STACK"]),
        "num_warps": num_warps,
        "num_stages": num_stages,
    }


# gpt-oss-20b: hidden 2880, 64 query / 8 KV heads of 64, expert width 2880, 32 experts, top-4;
# KV cache pages of 16 tokens, block tables wide enough for its 131072-token context.
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTER, EXPERTS, TOP_K = 2880, 64, 8, 64, 2880, 32, 4
PAGE, TABLE_WIDTH, WINDOW = 16, 131072 // 16, 128
QKV_WIDTH = (HEADS + 2 * KV_HEADS) * HEAD_DIM  # q, k and v are views of one fused projection
Q_STRIDES = {"stride_qt": HEADS * HEAD_DIM, "stride_qh": HEAD_DIM, "stride_ot": HEADS * HEAD_DIM, "stride_oh": HEAD_DIM}


def _rms_norm() -> dict:
    from kernels.triton import norm

    return _compile(
        norm._rms_norm_kernel,
        {"x_ptr": BF16, "res_ptr": BF16, "w_ptr": BF16, "out_ptr": BF16, "sum_ptr": BF16, "eps": "fp32"},
        {"HAS_RESIDUAL": True, "BLOCK": 4096},
        ints={name: HIDDEN for name in ("n_cols", "stride_x", "stride_r", "stride_o", "stride_s")},
    )


def _rope_write_kv() -> dict:
    from kernels.triton import rope

    return _compile(
        rope._rope_write_kv_kernel,
        {"q_ptr": BF16, "k_ptr": BF16, "v_ptr": BF16, "q_out_ptr": BF16, "k_cache_ptr": BF16, "v_cache_ptr": BF16,
         "pos_ptr": "*i64", "inv_freq_ptr": "*fp32", "slot_ptr": "*i64", "mscale": "fp32"},
        {"BLOCK_HQ": 64, "BLOCK_HKV": 8, "BLOCK_HALF": 32, "BLOCK_D": 64},
        ints={
            "stride_qt": QKV_WIDTH, "stride_qh": HEAD_DIM, "stride_kt": QKV_WIDTH, "stride_kh": HEAD_DIM,
            "stride_vt": QKV_WIDTH, "stride_vh": HEAD_DIM, "stride_ot": HEADS * HEAD_DIM, "stride_oh": HEAD_DIM,
            "stride_cs": KV_HEADS * HEAD_DIM, "stride_ch": HEAD_DIM, "num_heads": HEADS, "num_kv_heads": KV_HEADS,
            "head_dim": HEAD_DIM, "half": HEAD_DIM // 2,
        },
    )


ROUTING_POINTERS = {
    "logits_ptr": BF16, "ids_in_ptr": "*i64", "weights_in_ptr": "*fp32", "ids_ptr": "*i32", "weights_ptr": "*fp32",
    "chunk_counts_ptr": "*i32", "row_pair_ptr": "*i32", "row_weight_ptr": "*fp32", "tile_expert_ptr": "*i32",
    "tile_start_ptr": "*i32", "expert_end_ptr": "*i32", "zero_ptr": "*fp32",
}
# gpt-oss-20b: top-4 of 32 experts; 64-token chunks (the one-hot bound).
ROUTING_GPT_OSS = {"TOP_K": 4, "K_PAD": 4, "BLOCK_T": 64, "BLOCK_E": 32}


def _routing(from_logits: bool = True) -> dict:
    """One launch, batch-256 decode: 4 chunks of 64 tokens, 1024 pairs in row tiles of 64 (48 tiles at most)."""
    from kernels.triton import routing

    return _compile(
        routing._route_one_launch_kernel, ROUTING_POINTERS,
        {**ROUTING_GPT_OSS, "BLOCK_M": 64, "BLOCK_TILES": 64, "FROM_LOGITS": from_logits, "ZERO_BLOCK": 4096},
        ints={"zero_numel": 256 * HIDDEN, "T": 256, "num_experts": EXPERTS, "num_tiles": 48, "stride_l": EXPERTS},
    )


# Two launches, a 2048-token prefill: 32 chunks, 8192 pairs in row tiles of 128 (96 tiles at most).
PREFILL_ROUTING = {"T": 2048, "num_experts": EXPERTS, "num_chunks": 32}


def _routing_count() -> dict:
    from kernels.triton import routing

    return _compile(
        routing._route_count_kernel, ROUTING_POINTERS, {**ROUTING_GPT_OSS, "FROM_LOGITS": True, "ZERO_BLOCK": 4096},
        ints={**PREFILL_ROUTING, "zero_numel": 2048 * HIDDEN, "stride_l": EXPERTS},
    )


def _routing_place() -> dict:
    from kernels.triton import routing

    return _compile(
        routing._route_place_kernel, ROUTING_POINTERS,
        {**ROUTING_GPT_OSS, "BLOCK_M": 128, "BLOCK_TILES": 64, "BLOCK_C": 32}, num_warps=routing.PLACE_WARPS,
        ints={**PREFILL_ROUTING, "num_tiles": 96},
    )


def compile_elementwise() -> None:
    from kernels.triton import activation, kv_cache, mxfp4_matmul, rope

    _rms_norm()
    _rope_write_kv()
    _routing(from_logits=False)
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
    _compile(mxfp4_matmul._sum_row_groups_kernel, {"y_ptr": "*fp32", "out_ptr": BF16}, {"GROUP": 4, "BLOCK": 1024})


def _attention(num_splits: int, block_q: int, block_m: int, num_warps: int = 4) -> dict:
    """Four sequences (decode: split-K 8 is what 4 x 8 KV heads get on 132 SMs), a windowed layer."""
    from kernels.triton import attention

    return _compile(
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
        num_warps,
        ints={
            "num_seqs": 4, "window": WINDOW, **Q_STRIDES, "stride_cb": PAGE * KV_HEADS * HEAD_DIM,
            "stride_cs": KV_HEADS * HEAD_DIM, "stride_ch": HEAD_DIM, "stride_bt": TABLE_WIDTH, "num_heads": HEADS,
            "head_dim": HEAD_DIM,
        },
    )


def _merge_splits() -> dict:
    from kernels.triton import attention

    return _compile(
        attention._merge_splits_kernel,
        {"part_acc_ptr": "*fp32", "part_max_ptr": "*fp32", "part_sum_ptr": "*fp32", "sinks_ptr": BF16, "out_ptr": BF16},
        {"NUM_SPLITS": 8, "BLOCK_D": 64, "HAS_SINKS": True},
        ints={"stride_ot": HEADS * HEAD_DIM, "stride_oh": HEAD_DIM, "num_heads": HEADS, "head_dim": HEAD_DIM},
    )


def compile_attention() -> None:
    _attention(1, 32, 128, num_warps=8)  # prefill tiles of a 4-head group


# MoE gate_up (gather + SwiGLU), MoE down (route weight, atomically combined per token, split-K),
# MoE down deterministic (route weight, scattered to pair order), dense linear.
GATE_UP = {"SCHEDULED": True, "GATHER_A": True, "SCATTER_OUT": False, "ROUTE_WEIGHT": False, "SWIGLU": True,
           "ATOMIC_ADD": False}
DOWN = {"SCHEDULED": True, "GATHER_A": False, "SCATTER_OUT": True, "ROUTE_WEIGHT": True, "SWIGLU": False,
        "ATOMIC_ADD": True}
DOWN_DETERMINISTIC = {**DOWN, "ATOMIC_ADD": False}
DENSE = {"SCHEDULED": False, "GATHER_A": False, "SCATTER_OUT": False, "ROUTE_WEIGHT": False, "SWIGLU": False,
         "ATOMIC_ADD": False}


def _matmul_ints(flags: dict, tokens: int) -> dict[str, int]:
    """The integer arguments of the gpt-oss-20b launch (as `kernels.triton.moe` passes them) for `tokens`."""
    if flags is DENSE:  # a plain [2880, 2880] MXFP4 linear
        n, k, m, experts, a_div, out_div = HIDDEN, HIDDEN, tokens, 1, 1, 1
    elif flags["SWIGLU"]:  # gate_up [E, 2I, H], rows gathered from their token
        n, k, m, experts, a_div, out_div = 2 * INTER, HIDDEN, tokens * TOP_K, EXPERTS, TOP_K, 1
    else:  # down [E, H, I], rows scattered to their token (atomic) or to their pair
        n, k, m, experts, a_div, out_div = HIDDEN, INTER, tokens * TOP_K, EXPERTS, 1, TOP_K if flags["ATOMIC_ADD"] else 1
    return {
        "M": m, "N": n, "K": k, "num_experts": experts, "a_rows_div": a_div, "out_rows_div": out_div,
        "stride_am": k, "stride_we": n * k // 2, "stride_wn": 0, "stride_se": n * k // 32, "stride_be": n,
        "stride_om": n // 2 if flags["SWIGLU"] else n,
    }


def _matmul(flags: dict, shape_class: str, tokens: int, split_k: int = 1, activations: str = "bf16") -> dict:
    from kernels.triton import mxfp4_matmul

    t = mxfp4_matmul.HOPPER_TILES[shape_class]
    return _compile(
        mxfp4_matmul._matmul_kernel,
        {
            "a_ptr": f"*{activations}", "w_ptr": "*u8", "s_ptr": "*u8", "bias_ptr": BF16,
            "out_ptr": "*fp32" if flags["ATOMIC_ADD"] or flags is DOWN_DETERMINISTIC or split_k > 1 else BF16,
            "a_rows_ptr": "*i32", "out_rows_ptr": "*i32", "route_w_ptr": "*fp32", "tile_expert_ptr": "*i32",
            "tile_start_ptr": "*i32", "expert_end_ptr": "*i32", "alpha": "fp32", "limit": "fp32",
        },
        {**flags, "MXFP4": True, "HAS_BIAS": True, "UPCAST": False, "SPLIT_K": split_k,
         "PRECISION": "ieee" if activations == "fp32" else "tf32",
         "DOT_FORMAT": "" if activations == "fp32" else activations,
         "BLOCK_M": t.block_m, "BLOCK_N": t.block_n, "BLOCK_K": TILE_K},
        t.num_warps, t.num_stages, _matmul_ints(flags, tokens),
    )


def compile_matmul() -> None:
    _matmul(DOWN, "large", 2048)  # prefill tiles (gate_up's are among the figures)
    _matmul(DOWN_DETERMINISTIC, "decode", 1)
    _matmul(DENSE, "decode", 1, activations="fp32")  # the hand-written decode for fp32 activations


def _tiles(shape_class: str) -> str:
    from kernels.triton import mxfp4_matmul

    t = mxfp4_matmul.HOPPER_TILES[shape_class]
    return f"{shape_class} tiles {t.block_m}x{t.block_n}x{TILE_K}"


def decode_figures() -> list[tuple[str, str, dict]]:
    """(kernel, gpt-oss-20b configuration, resources) for every Triton launch of a decode layer (the qkv,
    o and router projections are cuBLAS), and the prefill attention tile."""
    return [
        ("rms_norm (+residual)", "hidden 2880, BLOCK 4096", _rms_norm()),
        ("rope_write_kv", "64 q / 8 kv heads x 64", _rope_write_kv()),
        ("paged_attention", "batch 4, GROUP 8, BLOCK_M 16, split-K 8", _attention(8, 2, 16)),
        ("merge_splits", "8 splits, head_dim 64", _merge_splits()),
        ("paged_attention", "prefill: BLOCK_M 128 (16 tokens x 8 heads)", _attention(1, 16, 128, num_warps=8)),
        ("moe routing (one launch)", "top-4 of 32, batch 256 (4 chunks of 64)", _routing()),
        ("moe routing, launch 1 of 2", "prefill 2048: 64-token chunks", _routing_count()),
        ("moe routing, launch 2 of 2", "prefill 2048: 64-token chunks", _routing_place()),
        ("mxfp4 gate_up + SwiGLU", f"batch 1: {_tiles('decode')}", _matmul(GATE_UP, "decode", 1)),
        ("mxfp4 down + combine", f"batch 1: {_tiles('decode')}, split-K 2", _matmul(DOWN, "decode", 1, split_k=2)),
        ("mxfp4 gate_up + SwiGLU", f"batch 256: {_tiles('small')}", _matmul(GATE_UP, "small", 256)),
        ("mxfp4 down + combine", f"batch 256: {_tiles('small')}", _matmul(DOWN, "small", 256)),
        ("mxfp4 gate_up + SwiGLU", f"prefill 2048: {_tiles('large')}", _matmul(GATE_UP, "large", 2048)),
        ("mxfp4 linear (not in gpt-oss)", f"[2880, 2880], batch 1: {_tiles('decode')}, split-K 5 partials",
         _matmul(DENSE, "decode", 1, split_k=5)),
    ]


def check_decode_figures() -> None:
    for name, config, r in decode_figures():
        assert r["spill_bytes"] == 0, f"{name} ({config}) spills {r['spill_bytes']} bytes"
        assert r["shared_bytes"] <= SMEM_LIMIT, f"{name} ({config}) needs {r['shared_bytes']} bytes of shared memory"


def print_figures() -> None:
    print("| kernel | gpt-oss-20b configuration (decode unless said) | warps | stages | registers/thread | shared memory | spills |")
    print("|---|---|---|---|---|---|---|")
    for name, config, r in decode_figures():
        print(
            f"| {name} | {config} | {r['num_warps']} | {r['num_stages']} | {r['registers']} | "
            f"{r['shared_bytes'] / 1024:.1f} KiB | {r['spill_bytes']} B |"
        )


GROUPS = {
    "elementwise": compile_elementwise,
    "attention": compile_attention,
    "matmul": compile_matmul,
    "decode": check_decode_figures,
}


@pytest.mark.parametrize("group", list(GROUPS))
def test_kernels_compile_for_hopper(group):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, __file__, group], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]


if __name__ == "__main__":
    {**GROUPS, "figures": print_figures}[sys.argv[1]]()
