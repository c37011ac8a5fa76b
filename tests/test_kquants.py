"""q4_k_m GGUF export: tunelab's Q4_K / Q6_K encoders against gguf's own decoder and a scalar transliteration of
llama.cpp's reference C, llama.cpp's Q4_K_M type mix, and the written file run by real llama.cpp when installed."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_chat_tokenizer_build

from tunelab.export.kquants import (make_qkx2_quants, make_qx_quants, q4_k_m_type, quantize_q4_k, quantize_q6_k,
                                    use_more_bits)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _rel_rmse(a, b):
    return float(np.sqrt(((a - b) ** 2).mean()) / a.std())


@pytest.mark.unit
def test_blocks_decode_with_ggufs_own_decoder_and_beat_the_legacy_types():
    """gguf.quants (an independent implementation of the format) decodes our bytes back to the data: the error is
    below Q4_0's for Q4_K and below Q5_0's for Q6_K on Gaussian weights, a zero row and a constant block come back
    exact to fp16, and the sizes are 144 / 210 bytes per 256 values."""
    from gguf import GGMLQuantizationType as T
    from gguf import quants

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((48, 768)) * 0.03).astype(np.float32)
    x[7] = 0.0
    x[9, :256] = 0.02
    x[11, 256:512] = rng.standard_normal(256) * 5  # one wide block among narrow ones
    q4k, q6k = quantize_q4_k(x), quantize_q6_k(x)
    assert q4k.shape == (48, 3 * 144) and q6k.shape == (48, 3 * 210) and q4k.dtype == np.uint8
    back4, back6 = quants.dequantize(q4k, T.Q4_K), quants.dequantize(q6k, T.Q6_K)
    legacy4 = quants.dequantize(quants.quantize(x, T.Q4_0), T.Q4_0)
    legacy5 = quants.dequantize(quants.quantize(x, T.Q5_0), T.Q5_0)
    assert _rel_rmse(x, back4) < 0.85 * _rel_rmse(x, legacy4) and _rel_rmse(x, back4) < 0.08
    assert _rel_rmse(x, back6) < 0.6 * _rel_rmse(x, legacy5) and _rel_rmse(x, back6) < 0.025
    for back in (back4, back6):
        assert np.all(back[7] == 0)
        assert np.abs(back[9, :256] - 0.02).max() < 2e-4


def _qkx2_scalar(x, w, nmax=15, rmin=-1.0, rdelta=0.1, nstep=20):
    """llama.cpp's make_qkx2_quants, line by line (ggml-quants.c), one sub-block."""
    mn, mx = min(x), max(x)
    sum_w, sum_x = sum(w), sum(wi * xi for wi, xi in zip(w, x))
    mn = min(mn, 0.0)
    if mx == mn:
        return 0.0, -mn, [0] * len(x)
    iscale = nmax / (mx - mn)
    scale = 1 / iscale
    L = [max(0, min(nmax, round(iscale * (xi - mn)))) for xi in x]
    best = sum(wi * (scale * li + mn - xi) ** 2 for wi, li, xi in zip(w, L, x))
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * step + nmax) / (mx - mn)
        laux = [max(0, min(nmax, round(iscale * (xi - mn)))) for xi in x]
        sl = sum(wi * li for wi, li in zip(w, laux))
        sl2 = sum(wi * li * li for wi, li in zip(w, laux))
        sxl = sum(wi * li * xi for wi, li, xi in zip(w, laux, x))
        D = sum_w * sl2 - sl * sl
        if D > 0:
            this_scale = (sum_w * sxl - sum_x * sl) / D
            this_min = (sl2 * sum_x - sl * sxl) / D
            if this_min > 0:
                this_min, this_scale = 0.0, sxl / sl2
            err = sum(wi * (this_scale * li + this_min - xi) ** 2 for wi, li, xi in zip(w, laux, x))
            if err < best:
                L, best, scale, mn = laux, err, this_scale, this_min
    return scale, -mn, L


@pytest.mark.parity
def test_vectorised_search_equals_the_reference_c_transliterated():
    """make_qkx2_quants / make_qx_quants over many sub-blocks at once give the scalar C transliteration's scale,
    min and levels on 90% of sub-blocks and an error within 2% on all (the search runs in float32, as llama.cpp's
    does, the transliteration in float64, so near-equal candidates may be picked differently)."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((40, 32)) * rng.uniform(0.01, 1, (40, 1))).astype(np.float32)
    x[5] = np.abs(x[5])  # min > 0 branch
    w = np.sqrt((x * x).mean(axis=1, keepdims=True)) + np.abs(x)
    scale, the_min, L = make_qkx2_quants(x, w)
    same = 0
    for i in range(len(x)):
        s, m, l = _qkx2_scalar([float(v) for v in x[i]], [float(v) for v in w[i]])
        same += math.isclose(scale[i], s, rel_tol=1e-4) and math.isclose(the_min[i], m, rel_tol=1e-4, abs_tol=1e-7)
        err = float((w[i] * (scale[i] * L[i] - the_min[i] - x[i]) ** 2).sum())
        ref = float((w[i] * (s * np.array(l) - m - x[i]) ** 2).sum())
        assert err <= ref * 1.02 + 1e-12  # float32 (as llama.cpp) vs float64 may pick another near-equal candidate
    assert same >= 0.9 * len(x)

    y = (rng.standard_normal((30, 16))).astype(np.float32)
    s6, L6 = make_qx_quants(y, 32)
    for i in range(len(y)):
        amax = y[i][np.abs(y[i]).argmax()]
        best_l, best_s, best = None, 0.0, -1.0
        for step in [0] + [k for k in range(-9, 10) if k]:
            isc = -(32 + 0.1 * step) / amax
            l = np.clip(np.rint(isc * y[i]), -32, 31)
            sumlx, suml2 = float((y[i] ** 2 * y[i] * l).sum()), float((y[i] ** 2 * l * l).sum())
            if step == 0:
                best_l, best_s, best = l, sumlx / suml2, sumlx * sumlx / suml2
            elif suml2 > 0 and sumlx * sumlx > best * suml2:
                best_l, best_s, best = l, sumlx / suml2, sumlx * sumlx / suml2
        assert math.isclose(s6[i], best_s, rel_tol=1e-4)
        assert np.array_equal(L6[i], (best_l + 32).astype(np.int32))


@pytest.mark.unit
def test_q4_k_m_gives_each_tensor_llama_cpps_type():
    """llama_tensor_get_type under Q4_K_M: use_more_bits layers (first/last eighth, every third between) get Q6_K
    in attn_v and ffn_down; the output projection (the embedding when tied) Q6_K; rows not a multiple of 256 fall
    back (Q4_K -> Q5_0, Q6_K -> Q8_0), as in SmolLM2 (576-wide rows)."""
    from gguf import GGMLQuantizationType as T

    assert [i for i in range(30) if use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert q4_k_m_type("blk.0.attn_v.weight", 512, 30, True) == T.Q6_K
    assert q4_k_m_type("blk.3.attn_v.weight", 512, 30, True) == T.Q4_K
    assert q4_k_m_type("blk.5.ffn_down.weight", 1536, 30, True) == T.Q6_K
    assert q4_k_m_type("blk.4.ffn_down.weight", 1536, 30, True) == T.Q4_K
    assert q4_k_m_type("blk.4.attn_q.weight", 512, 30, True) == T.Q4_K
    assert q4_k_m_type("output.weight", 512, 30, True) == T.Q6_K
    assert q4_k_m_type("token_embd.weight", 512, 30, True) == T.Q4_K
    assert q4_k_m_type("token_embd.weight", 512, 30, False) == T.Q6_K  # tied: the embedding is the output
    assert q4_k_m_type("token_embd.weight", 576, 30, False) == T.Q8_0
    assert q4_k_m_type("blk.4.attn_q.weight", 576, 30, False) == T.Q5_0
    assert q4_k_m_type("blk.0.attn_v.weight", 576, 30, False) == T.Q8_0
    assert q4_k_m_type("blk.4.attn_q.weight", 100, 30, False) == T.F16


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory) -> Path:
    """A tiny Llama whose rows are 256 / 512 wide, so Q4_K and Q6_K are really used (not the fallbacks)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("wide_llama") / "model"
    tok = tiny_chat_tokenizer_build()
    torch.manual_seed(4)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=512, max_position_embeddings=256,
                      bos_token_id=None, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.e2e
def test_q4_k_m_export_reads_back_within_tolerance(wide_llama, tmp_path):
    """The file transformers reads back is within q4_k_m's tolerance, between q8_0 and q4_0 in logit error, with
    the Q4_K / Q6_K / F32 mix llama.cpp would write; the file type says MOSTLY_Q4_K_M."""
    import gguf

    from tunelab.export.run_export import export_run

    out = export_run(wide_llama, tmp_path / "g", "gguf", ["q8_0", "q4_k_m", "q4_0"], llama_cpp="off")
    files = {f["quant"]: f for f in out["files"]}
    km = files["q4_k_m"]
    assert km["check"]["passed"] and km["check"]["tokenizer_equal"]
    assert set(km["tensor_types"]) == {"Q4_K", "Q6_K", "F32"}
    rel = {q: f["check"]["relative_logit_diff"] for q, f in files.items()}
    assert rel["q8_0"] < rel["q4_k_m"] < rel["q4_0"]
    reader = gguf.GGUFReader(km["file"])
    assert int(reader.fields["general.file_type"].contents()) == int(gguf.LlamaFileType.MOSTLY_Q4_K_M)
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"


@pytest.mark.slow
@pytest.mark.e2e
def test_real_llama_cpp_loads_and_runs_the_files(wide_llama, tmp_path):
    """Real llama.cpp (node-llama-cpp's CPU build) loads the f16 and q4_k_m files, splits the prompts into the
    tokenizer's ids, and continues them greedily as the source does (near-ties excepted)."""
    from tunelab.export.llamacpp import available
    from tunelab.export.run_export import export_run

    if available():
        pytest.skip(f"llama.cpp: {available()}")
    out = export_run(wide_llama, tmp_path / "g", "gguf", ["f16", "q4_k_m"], llama_cpp="on")
    for f in out["files"]:
        lc = f["check"]["llama_cpp"]
        assert lc["ran"] and lc["passed"] and lc["tokenizer_equal"], lc
        assert lc["greedy_equal"] + lc["greedy_near_ties"] == len(lc["per_prompt"])
