"""DPO parity with TRL's DPOTrainer (the bench extra; skipped without it): the same tiny model, the
same reference, the same pairs, one batch — the loss, the rewards, the margin and the accuracy.

The chat template here ends a turn at `<|im_end|>` with no trailing newline: TRL supervises every
completion token after the prompt, the newline after the end-of-turn marker included, where
tunelab's chat masks stop at the marker (the model never generates what follows it). Without the
newline both supervise exactly the same tokens, so the numbers must agree.
"""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_chat_tokenizer_build, tiny_llama_build

trl = pytest.importorskip("trl")

pytestmark = pytest.mark.parity
torch.set_num_threads(1)  # hidden-32 models: a second thread only waits on a shared 2-core box

TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' }}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
ROWS = [
    ("What is two plus two?", "Four.", "Six, I think."),
    ("Name a color.", "Red.", "Apple."),
    ("Translate hello to French.", "Bonjour.", "Thank you!"),
    ("Tell me a story about a cat.", "A cat and a dog sing at every tide.", "No."),
]


def test_dpo_loss_and_rewards_match_trl_dpotrainer(tmp_path):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from tunelab.data.chat import Message
    from tunelab.data.preference import PreferencePair, encode_pairs
    from tunelab.tasks.preference import PreferenceStats, make_loss_fn, measures_row, pair_batch
    from tunelab.tasks.preference_logps import answer_logps
    from tunelab.train.preference_losses import PreferenceLoss

    tok = tiny_chat_tokenizer_build()
    tok.chat_template = TEMPLATE
    reference = tiny_llama_build(len(tok), seed=0)
    policy = tiny_llama_build(len(tok), seed=0)
    torch.manual_seed(3)
    with torch.no_grad():  # a policy that has moved away from its reference: the loss is not log 2
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    beta = 0.1

    # TRL: conversational pairs, its own tokenisation and collation, one batch of all four pairs
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": q}], "chosen": [{"role": "assistant", "content": c}],
                             "rejected": [{"role": "assistant", "content": r}]} for q, c, r in ROWS])
    args = DPOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(ROWS), beta=beta, use_cpu=True,
                     bf16=False, report_to=[], max_length=None, dataloader_num_workers=0)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=ds, processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    policy.train()
    trl_loss = trainer.compute_loss(policy, batch).item()
    m = {k: v[-1] for k, v in trainer._metrics["train"].items() if v}

    # tunelab: the same pairs, its masks, its loss
    pairs = [PreferencePair([Message("user", q)], [Message("assistant", c)], [Message("assistant", r)], f"#{i}")
             for i, (q, c, r) in enumerate(ROWS)]
    encoded, _ = encode_pairs(pairs, tok, 1024)
    ours_batch = pair_batch(encoded, list(range(len(ROWS))), tok.pad_token_id)
    with torch.no_grad():
        ours_batch["ref_logps"], _ = answer_logps(reference.eval(), ours_batch)
    stats = PreferenceStats()
    loss_sum, n = make_loss_fn(PreferenceLoss("dpo", beta), stats)(policy, ours_batch)
    row = measures_row(stats.take())

    assert loss_sum.item() / n == pytest.approx(trl_loss, abs=1e-5)
    assert abs(trl_loss - 0.6931) > 1e-3  # the comparison is not between two untouched models
    assert row["reward_chosen"] == pytest.approx(m["rewards/chosen"], abs=1e-5)
    assert row["reward_rejected"] == pytest.approx(m["rewards/rejected"], abs=1e-5)
    assert row["reward_margin"] == pytest.approx(m["rewards/margins"], abs=1e-5)
    assert row["pref_accuracy"] == pytest.approx(m["rewards/accuracies"], abs=1e-6)
    # the chunked vocabulary projection (train.loss_chunk_tokens, the run's default) gives TRL's loss too
    chunked_stats = PreferenceStats()
    chunked_sum, _ = make_loss_fn(PreferenceLoss("dpo", beta), chunked_stats, 3)(policy, ours_batch)
    assert chunked_sum.item() / n == pytest.approx(trl_loss, abs=1e-5)
    assert measures_row(chunked_stats.take())["reward_margin"] == pytest.approx(m["rewards/margins"], abs=1e-5)
