"""models/packed_attention.py: attention per packed example equals the block-diagonal-mask path."""

from __future__ import annotations

import pytest
import torch

from tunelab.data.packing import collate_packed, stack_rows
from tunelab.models.packed_attention import segments, use_packed_attention

pytestmark = [pytest.mark.parity, pytest.mark.usefixtures("one_torch_thread")]


def _llama(kv_heads: int = 2, attn: str = "sdpa"):
    """Tiny Llama with grouped-query attention (4 query heads, `kv_heads` key/value heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=400, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=kv_heads, intermediate_size=64, max_position_embeddings=256,
                      bos_token_id=None, eos_token_id=2, pad_token_id=0)
    cfg._attn_implementation = attn
    return LlamaForCausalLM(cfg).eval()


def _examples(lengths, seed=1):
    from tunelab.data.chat_template import IGNORE_INDEX, EncodedExample

    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, 400, (n,), generator=g).tolist()
        out.append(EncodedExample(ids, [IGNORE_INDEX] + ids[1:]))
    return out


def _two_rows(exs):
    """Two packed rows of unequal length: the shorter one is padded (pad tokens at position 0)."""
    return stack_rows([collate_packed(exs, [0, 1, 2]), collate_packed(exs, [3, 4, 5])], pad_id=0)


def test_segments_start_where_positions_restart():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 0], [0, 1, 2, 3, 4, 5, 6]])
    assert segments(pos) == [[(0, 3), (3, 5), (5, 6), (6, 7)], [(0, 7)]]


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_split_logits_and_grads_equal_masked_path(kv_heads):
    exs = _examples([7, 12, 5, 9, 1, 20])
    batch = _two_rows(exs)
    ref, split = _llama(kv_heads), _llama(kv_heads)
    assert use_packed_attention(split)
    a = ref(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
            attention_mask=batch["attention_mask"]).logits
    b = split(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    assert (a - b).abs().max().item() < 1e-5
    real = batch["labels"] != -100
    a[real].square().sum().backward()
    b[real].square().sum().backward()
    for (name, p), q in zip(ref.named_parameters(), split.parameters()):
        assert (p.grad - q.grad).norm() <= 1e-5 * p.grad.norm(), name


def test_split_packed_logits_equal_each_example_alone():
    exs = _examples([7, 12, 5, 9])
    row = collate_packed(exs, [0, 1, 2, 3])
    model = _llama(2)
    use_packed_attention(model)
    with torch.no_grad():
        packed = model(input_ids=row["input_ids"], position_ids=row["position_ids"]).logits[0]
        start = 0
        for e in exs:
            alone = model(input_ids=torch.tensor([e.input_ids])).logits[0]
            assert (packed[start : start + len(e)] - alone).abs().max().item() < 1e-5
            start += len(e)


def test_split_under_bf16_autocast_close_to_masked_path():
    batch = _two_rows(_examples([30, 50, 20, 40, 1, 61]))
    ref, split = _llama(2), _llama(2)
    use_packed_attention(split)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a = ref(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                attention_mask=batch["attention_mask"]).logits.float()
        b = split(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits.float()
    real = batch["labels"] != -100
    # bf16 rounding of two kernels' different summation orders, against logits of std ~1
    assert (a - b)[real].abs().max().item() < 0.05 * a[real].std().item()


def test_padding_masks_and_generation_go_through_plain_sdpa():
    ref, split = _llama(2), _llama(2)
    use_packed_attention(split)
    ids = torch.randint(3, 400, (2, 9), generator=torch.Generator().manual_seed(3))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    with torch.no_grad():
        a = ref(input_ids=ids, attention_mask=mask).logits
        b = split(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(a[mask.bool()], b[mask.bool()])
    out_a = ref.generate(ids[:1], max_new_tokens=6, do_sample=False)
    out_b = split.generate(ids[:1], max_new_tokens=6, do_sample=False)
    assert out_a.tolist() == out_b.tolist()


def test_models_without_sdpa_are_left_alone():
    model = _llama(2, attn="eager")
    assert not use_packed_attention(model)
    assert model.config._attn_implementation == "eager"
