"""Encode Q4_K and Q6_K GGUF blocks (llama.cpp's k-quants) in numpy, and choose the q4_k_m type mix.

Why our own encoder: the `gguf` package (0.19, llama.cpp's own Python library) decodes Q4_K and
Q6_K but does not encode them, and llama.cpp's `llama-quantize` is a C++ binary that is not on
PyPI. q4_k_m is the type most local-inference users ask for (Ollama's default pull), so tunelab
writes it itself. The encoders follow llama.cpp's reference C (`quantize_row_q4_K_ref`,
`quantize_row_q6_K_ref` with `make_qkx2_quants` / `make_qx_quants` in ggml-quants.c), vectorised
over every block at once; the bit layout is checked in the tests by decoding with `gguf.quants`
(an independent implementation of the format), and the files are loaded and run by real llama.cpp
(node-llama-cpp) in `tunelab.export.llamacpp`.

- Q4_K: super-blocks of 256 values, 8 sub-blocks of 32 each with a 6-bit scale and a 6-bit min
  (x ~= d*sc*q - dmin*m, q in 0..15), fp16 d and dmin: 144 bytes per 256 values (4.5 bits).
- Q6_K: super-blocks of 256, 16 sub-blocks of 16 each with an int8 scale (x ~= d*sc*(q-32),
  q in 0..63), fp16 d: 210 bytes per 256 values (6.5625 bits).

Rounding is np.rint (round half to even), which is what llama.cpp's `nearest_int` float trick does.
"""

from __future__ import annotations

import numpy as np

QK_K = 256


def _rint(a: np.ndarray) -> np.ndarray:
    return np.rint(a).astype(np.int32)


def make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int = 15, rmin: float = -1.0, rdelta: float = 0.1,
                     nstep: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of `x` (rows x n): (scale, the_min, L) minimising sum w*(scale*L - the_min - x)^2 over a
    sweep of candidate scales, each refined by weighted least squares (llama.cpp's make_qkx2_quants)."""
    x = x.astype(np.float32)
    mn = np.minimum(x.min(axis=1), 0.0)
    mx = x.max(axis=1)
    sum_w = w.sum(axis=1)
    sum_x = (w * x).sum(axis=1)
    span = mx - mn
    flat = span == 0
    safe = np.where(flat, 1.0, span).astype(np.float32)
    iscale = nmax / safe
    scale = 1.0 / iscale
    L = np.clip(_rint(iscale[:, None] * (x - mn[:, None])), 0, nmax)
    best = (w * (scale[:, None] * L + mn[:, None] - x) ** 2).sum(axis=1)
    the_min = mn.copy()  # as in the C, a better fit's min is also the origin of the next candidates
    for step in range(nstep + 1):
        cur = mx - the_min
        iscale = (rmin + rdelta * step + nmax) / np.where(cur > 0, cur, 1.0)
        laux = np.clip(_rint(iscale[:, None] * (x - the_min[:, None])), 0, nmax).astype(np.float32)
        sum_l = (w * laux).sum(axis=1)
        sum_l2 = (w * laux * laux).sum(axis=1)
        sum_xl = (w * laux * x).sum(axis=1)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Dsafe = np.where(ok, D, 1.0)
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Dsafe
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Dsafe
        pos = this_min > 0
        this_min = np.where(pos, 0.0, this_min)
        this_scale = np.where(pos, sum_xl / np.where(sum_l2 > 0, sum_l2, 1.0), this_scale)
        err = (w * (this_scale[:, None] * laux + this_min[:, None] - x) ** 2).sum(axis=1)
        better = ok & (err < best) & (cur > 0)
        L = np.where(better[:, None], laux.astype(np.int32), L)
        best = np.where(better, err, best)
        scale = np.where(better, this_scale, scale)
        the_min = np.where(better, this_min, the_min)
    scale = np.where(flat, 0.0, scale)
    the_min = np.where(flat, mn, the_min)
    L = np.where(flat[:, None], 0, L)
    return scale.astype(np.float32), (-the_min).astype(np.float32), L


def make_qx_quants(x: np.ndarray, nmax: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Per row of `x`: (signed scale, L in 0..2*nmax-1) for x ~= scale*(L - nmax), weights x^2, over 19
    candidate scales around -nmax/max (llama.cpp's make_qx_quants with rmse_type 1)."""
    x = x.astype(np.float32)
    idx = np.abs(x).argmax(axis=1)
    mx = x[np.arange(len(x)), idx]
    tiny = np.abs(mx) < 1e-15
    safe = np.where(tiny, 1.0, mx)
    w = x * x

    def fit(iscale):
        l = np.clip(_rint(iscale[:, None] * x), -nmax, nmax - 1)
        lf = l.astype(np.float32)
        return l, (w * x * lf).sum(axis=1), (w * lf * lf).sum(axis=1)

    l, sumlx, suml2 = fit(-nmax / safe)
    scale = np.where(suml2 > 0, sumlx / np.where(suml2 > 0, suml2, 1.0), 0.0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        lc, sx, s2 = fit(-(nmax + 0.1 * step) / safe)
        better = (s2 > 0) & (sx * sx > best * s2)
        l = np.where(better[:, None], lc, l)
        scale = np.where(better, sx / np.where(s2 > 0, s2, 1.0), scale)
        best = np.where(better, scale * sx, best)
    scale = np.where(tiny, 0.0, scale)
    l = np.where(tiny[:, None], 0, l)
    return scale.astype(np.float32), (l + nmax).astype(np.int32)


def quantize_q4_k(arr: np.ndarray) -> np.ndarray:
    """Rows of `arr` (last dim a multiple of 256) as Q4_K bytes: shape (..., row_len // 256 * 144), uint8."""
    rows = arr.reshape(-1, QK_K).astype(np.float32)
    nb = len(rows)
    sub = rows.reshape(nb * 8, 32)
    av = np.sqrt((sub * sub).mean(axis=1, keepdims=True))
    scales, mins, L = make_qkx2_quants(sub, av + np.abs(sub))
    scales, mins, L = scales.reshape(nb, 8), mins.reshape(nb, 8), L.reshape(nb, 8, 32)
    max_scale, max_min = scales.max(axis=1), mins.max(axis=1)
    inv_scale = np.where(max_scale > 0, 63.0 / np.where(max_scale > 0, max_scale, 1), 0.0)
    inv_min = np.where(max_min > 0, 63.0 / np.where(max_min > 0, max_min, 1), 0.0)
    ls = np.minimum(63, _rint(inv_scale[:, None] * scales)).astype(np.uint8)
    lm = np.minimum(63, _rint(inv_min[:, None] * mins)).astype(np.uint8)
    d16, dmin16 = (max_scale / 63.0).astype(np.float16), (max_min / 63.0).astype(np.float16)
    d = d16.astype(np.float32)[:, None] * ls.astype(np.float32)
    dm = dmin16.astype(np.float32)[:, None] * lm.astype(np.float32)
    nz = d != 0
    req = np.clip(_rint((sub.reshape(nb, 8, 32) + dm[..., None]) / np.where(nz, d, 1)[..., None]), 0, 15)
    L = np.where(nz[..., None], req, L).astype(np.uint8)
    packed = np.zeros((nb, 12), dtype=np.uint8)
    packed[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    packed[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    packed[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    flat = L.reshape(nb, 4, 2, 32)  # 64-value groups: low nibble = first 32, high nibble = next 32
    qs = (flat[:, :, 0, :] | (flat[:, :, 1, :] << 4)).reshape(nb, 128)
    out = np.concatenate([d16[:, None].view(np.uint8), dmin16[:, None].view(np.uint8), packed, qs], axis=1)
    return out.reshape(*arr.shape[:-1], arr.shape[-1] // QK_K * 144)


def quantize_q6_k(arr: np.ndarray) -> np.ndarray:
    """Rows of `arr` (last dim a multiple of 256) as Q6_K bytes: shape (..., row_len // 256 * 210), uint8."""
    rows = arr.reshape(-1, QK_K).astype(np.float32)
    nb = len(rows)
    scales, L = make_qx_quants(rows.reshape(nb * 16, 16), 32)
    scales, L = scales.reshape(nb, 16), L.reshape(nb, 16, 16)
    pick = np.abs(scales).argmax(axis=1)
    max_scale = scales[np.arange(nb), pick]
    zero = np.abs(max_scale) < 1e-15
    iscale = np.where(zero, 0.0, -128.0 / np.where(zero, 1.0, max_scale))
    d16 = np.where(zero, 0.0, 1.0 / np.where(zero, 1.0, iscale)).astype(np.float16)
    sc = np.minimum(127, _rint(iscale[:, None] * scales)).astype(np.int8)
    d = d16.astype(np.float32)[:, None] * sc.astype(np.float32)
    nz = d != 0
    req = np.clip(_rint(rows.reshape(nb, 16, 16) / np.where(nz, d, 1)[..., None]), -32, 31) + 32
    L = np.where(nz[..., None], req, L)
    L = np.where(zero[:, None, None], 0, L).astype(np.uint8).reshape(nb, 2, 4, 32)  # 128-value halves, 4 x 32
    ql = np.concatenate([L[:, :, 0] & 0xF | ((L[:, :, 2] & 0xF) << 4),
                         L[:, :, 1] & 0xF | ((L[:, :, 3] & 0xF) << 4)], axis=2).reshape(nb, 128)
    qh = ((L[:, :, 0] >> 4) | ((L[:, :, 1] >> 4) << 2) | ((L[:, :, 2] >> 4) << 4)
          | ((L[:, :, 3] >> 4) << 6)).reshape(nb, 64)
    sc = np.where(zero[:, None], 0, sc).astype(np.int8)
    out = np.concatenate([ql, qh, sc.view(np.uint8), d16[:, None].view(np.uint8)], axis=1)
    return out.reshape(*arr.shape[:-1], arr.shape[-1] // QK_K * 210)


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """llama.cpp's rule for which layers get 6 bits under *_K_M: the first and last eighth, and every third
    layer in between (C integer division)."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def q4_k_m_type(name: str, row_len: int, n_layers: int, has_output: bool):
    """The GGML type llama.cpp's quantizer gives tensor `name` under LLAMA_FTYPE_MOSTLY_Q4_K_M
    (`llama_tensor_get_type`): Q6_K for the output projection (the embedding when tied), for attn_v and
    ffn_down in `use_more_bits` layers, Q4_K elsewhere; rows that do not divide into 256 fall back as
    llama.cpp does (Q4_K -> Q5_0, Q6_K -> Q8_0, and the output to Q8_0)."""
    from gguf import GGMLQuantizationType as T

    output = name == "output.weight" or (not has_output and name == "token_embd.weight")
    if output:
        return T.Q6_K if row_len % QK_K == 0 else T.Q8_0
    wanted = T.Q4_K
    layer = _layer_index(name)
    if layer is not None and (".attn_v." in name or ".ffn_down." in name) and use_more_bits(layer, n_layers):
        wanted = T.Q6_K
    if row_len % QK_K == 0:
        return wanted
    fallback = T.Q5_0 if wanted == T.Q4_K else T.Q8_0
    return fallback if row_len % 32 == 0 else T.F16


def _layer_index(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "blk" and parts[1].isdigit() else None
