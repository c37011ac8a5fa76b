"""Parameter groups: head lr, no decay on biases/norms, layer-wise decay per block."""

import pytest
from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

from tunelab.errors import InputError
from tunelab.models.anatomy import find_blocks
from tunelab.train.optim import param_groups

pytestmark = pytest.mark.unit


def bert():
    return BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3,
                                                    num_attention_heads=2, intermediate_size=32, num_labels=2))


def llama():
    return LlamaForSequenceClassification(LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3,
                                                      num_attention_heads=2, num_key_value_heads=2,
                                                      intermediate_size=32, num_labels=2, pad_token_id=0))


def lr_of(groups, name):
    for g in groups:
        if any(p is name for p in g["params"]):
            return g["lr"], g["weight_decay"]
    raise KeyError


def test_flat_groups_with_head_lr_and_no_decay_on_bias_and_norm():
    m = bert()
    groups = param_groups(m, lr=1e-4, weight_decay=0.1, head_lr=1e-3)
    assert lr_of(groups, m.classifier.weight) == (1e-3, 0.1)
    assert lr_of(groups, m.classifier.bias) == (1e-3, 0.0)
    assert lr_of(groups, m.bert.encoder.layer[0].attention.self.query.weight) == (1e-4, 0.1)
    assert lr_of(groups, m.bert.embeddings.LayerNorm.weight) == (1e-4, 0.0)
    n = sum(p.numel() for g in groups for p in g["params"])
    assert n == sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("make,blocks,emb,top", [
    (bert, lambda m: m.bert.encoder.layer, lambda m: m.bert.embeddings.word_embeddings.weight,
     lambda m: m.bert.pooler.dense.weight),
    (llama, lambda m: m.model.layers, lambda m: m.model.embed_tokens.weight, lambda m: m.model.norm.weight),
])
def test_layer_lr_decay_matches_ulmfit_formula(make, blocks, emb, top):
    m = make()
    lr, d, n = 1.0, 0.5, 3
    groups = param_groups(m, lr=lr, weight_decay=0.0, head_lr=2.0, layer_lr_decay=d)
    for i, block in enumerate(blocks(m)):
        for p in block.parameters():
            assert lr_of(groups, p)[0] == pytest.approx(lr * d ** (n - i))
    assert lr_of(groups, emb(m))[0] == pytest.approx(lr * d ** (n + 1))
    assert lr_of(groups, top(m))[0] == pytest.approx(lr)
    head = m.classifier.weight if hasattr(m, "classifier") else m.score.weight
    assert lr_of(groups, head)[0] == 2.0


def test_frozen_parameters_get_no_group():
    m = bert()
    for p in m.bert.embeddings.parameters():
        p.requires_grad = False
    groups = param_groups(m, lr=1e-4, weight_decay=0.0)
    ids = {id(p) for g in groups for p in g["params"]}
    assert id(m.bert.embeddings.word_embeddings.weight) not in ids


def test_unknown_layout_is_a_clear_error():
    import torch

    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(2, 2)

    with pytest.raises(InputError, match="layer_lr_decay"):
        param_groups(Odd(), lr=1e-3, weight_decay=0.0, layer_lr_decay=0.9)
    with pytest.raises(InputError, match="cannot find the transformer blocks of Odd"):
        find_blocks(Odd())


def test_unknown_layout_error_names_the_option_that_needed_the_blocks():
    import torch

    from tunelab.models.adapt import freeze

    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Linear(2, 2)

    with pytest.raises(InputError, match="freeze.blocks") as e:
        freeze(Odd(), blocks=1)
    assert "layer_lr_decay" not in str(e.value) and e.value.field == "freeze.blocks"
