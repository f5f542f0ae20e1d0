"""Triton helper: gather a tile of keys from a paged cache by their absolute positions."""

import triton
import triton.language as tl


@triton.jit
def load_paged_keys(
    k_ptr,
    bt_row_ptr,
    keys,
    key_ok,
    head,
    d,
    d_ok,
    stride_kp,
    stride_ks,
    stride_kh,
    stride_kd,
    PAGE: tl.constexpr,
):
    """Keys at positions `keys` [N] of one sequence (page ids from its block-table row).

    Returns the [N, BLOCK_D] tile in the cache dtype; rows with key_ok False and columns
    with d_ok False read as 0.
    """
    page = tl.load(bt_row_ptr + keys // PAGE, mask=key_ok, other=0).to(tl.int64)
    offs = page * stride_kp + (keys % PAGE).to(tl.int64) * stride_ks + head * stride_kh
    ptrs = k_ptr + offs[:, None] + d[None, :] * stride_kd
    return tl.load(ptrs, mask=key_ok[:, None] & d_ok[None, :], other=0.0)
