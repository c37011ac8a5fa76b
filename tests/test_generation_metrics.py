"""Generation metrics against hand-computed values on hand-made replies, and the health events they raise."""

from __future__ import annotations

import pytest

from tunelab.evaluate.generation_metrics import (cross_prompt_similarity, distinct_n, duplicate_share,
                                                 generation_metrics, has_loop, leaked_markers, longest_loop,
                                                 reference_scores, repeated_ngram_share, words)
from tunelab.monitor.health import HealthMonitor

pytestmark = pytest.mark.unit


def test_words_split_punctuation_alone():
    assert words("Hello, World!!") == ["hello", ",", "world", "!", "!"]


def test_distinct_n_by_hand():
    u = "a b a b".split()
    assert distinct_n(u, 1) == 2 / 4
    assert distinct_n(u, 2) == 2 / 3  # ab, ba, ab
    assert distinct_n(["a"], 2) is None


def test_repeated_4gram_share_by_hand():
    # abcd bcda cdab dabc abcd: 5 four-grams, 4 distinct -> 1 of 5 repeats an earlier one
    assert repeated_ngram_share("a b c d a b c d".split(), 4) == pytest.approx(0.2)
    assert repeated_ngram_share("a b c d e".split(), 4) == 0.0
    assert repeated_ngram_share("a b c".split(), 4) is None


def test_loops_by_hand():
    # x [a b a b a b] y: period 2, positions 1..4 equal to 2 ahead -> span 4 + 2 = 6
    assert longest_loop("x a b a b a b y".split()) == (2, 6)
    assert longest_loop("a b c d".split()) == (0, 0)
    assert not has_loop("x a b a b a b y".split())  # 3 repeats but only 6 words (< 8)
    assert has_loop(["ok"] * 8)
    assert has_loop(words("I am here. I am here. I am here. I am here."))  # period 4, span 16
    assert not has_loop(words("the cat sat on the mat and then the dog sat on the rug"))


def test_a_loop_inside_one_word_is_seen_in_the_tokens():
    replies = [{"reply": "eeeeeeee", "raw": "eeeeeeee", "ids": [7] * 8, "tokens": 8, "stopped": False},
               {"reply": "hello there", "raw": "hello there", "ids": [3, 4], "tokens": 2, "stopped": True}]
    assert generation_metrics(replies)["loop_rate"] == 0.5


def test_cross_prompt_similarity_by_hand():
    replies = [words("the cat sat"), words("the cat ran"), words("dogs bark loudly")]
    # bigram sets: {the cat, cat sat}, {the cat, cat ran}, {dogs bark, bark loudly}: J = 1/3, 0, 0
    assert cross_prompt_similarity(replies) == pytest.approx(1 / 9)
    assert cross_prompt_similarity([words("same reply here")] * 4) == 1.0
    assert cross_prompt_similarity([words("one")]) is None


def test_duplicates_and_leakage_by_hand():
    assert duplicate_share(["Hi there", "hi there", "bye"]) == pytest.approx(2 / 3)
    assert leaked_markers("Sure.<|im_start|>user", ["<|im_start|>", "<|im_end|>"]) == ["<|im_start|>"]
    assert leaked_markers("Sure.", ["<|im_start|>"]) == []


def test_reference_scores_are_the_libraries_own():
    from rouge_score import rouge_scorer

    s = reference_scores(["the cat on mat", "completely different words"],
                         ["the cat sat on the mat", "completely different words"])
    # ROUGE-L by hand: LCS("the cat sat on the mat", "the cat on mat") = 4 -> P 1, R 4/6, F 0.8; second pair 1.0
    assert s["rouge_l"] == pytest.approx((0.8 + 1.0) / 2)
    assert rouge_scorer.RougeScorer(["rougeL"]).score("the cat sat on the mat", "the cat on mat")["rougeL"].fmeasure \
        == pytest.approx(0.8)
    assert reference_scores(["abc def"], ["abc def"])["chrf"] == pytest.approx(100.0)
    assert reference_scores(["xyz"], ["abc"])["chrf"] == pytest.approx(0.0)


def _reply(text, tokens, stopped, raw=None):
    return {"reply": text, "raw": raw if raw is not None else text, "tokens": tokens, "stopped": stopped}


def test_generation_metrics_on_hand_made_replies():
    replies = [_reply("the cat sat", 3, True), _reply("the cat ran", 5, True),
               _reply("ok ok ok ok ok ok ok ok", 8, False), _reply("bye", 2, True, raw="bye<|im_start|>")]
    m = generation_metrics(replies, references=["the cat sat", None, None, "bye"], markers=["<|im_start|>"],
                           reference_tokens=[3, None, None, 1])
    assert m["n"] == 4 and m["stop_rate"] == 0.75
    assert m["length_mean"] == 4.5 and m["length_median"] == 4.0
    assert m["loop_rate"] == 0.25 and m["leakage_rate"] == 0.25 and m["leaked_markers"] == {"<|im_start|>": 1}
    # distinct-1 per reply: 1, 1, 1/8, 1 -> mean (3 + 1/8) / 4
    assert m["distinct_1"] == pytest.approx((3 + 1 / 8) / 4)
    # repeated 4-grams: only the "ok" reply has any (5, all the same: 4 of 5 repeat); the others give None
    assert m["repeated_4gram_share"] == pytest.approx(4 / 5)
    assert m["references"] == 2 and m["chrf"] == pytest.approx(100.0) and m["rouge_l"] == pytest.approx(1.0)
    assert m["reference_length_mean"] == 2.0 and m["length_ratio"] == pytest.approx(4.5 / 2.0)


def _gen_row(step, **gen):
    base = {"stop_rate": 0.9, "cross_similarity": 0.05, "repeated_4gram_share": 0.0, "loop_rate": 0.0,
            "leakage_rate": 0.0, "max_new_tokens": 32, "chat": 1}
    return {"step": step, "eval_loss": 1.0, **{f"eval_gen_{k}": v for k, v in {**base, **gen}.items()}}


def test_health_events_from_generation_rows():
    mon = HealthMonitor()
    assert mon.observe({**_gen_row(0, stop_rate=0.9), "before_training": True}) == []
    assert mon.observe(_gen_row(10)) == []  # healthy
    events = mon.observe(_gen_row(20, stop_rate=0.1, cross_similarity=0.8, loop_rate=0.5, leakage_rate=0.3))
    kinds = {e.kind for e in events}
    assert kinds == {"never_stops", "mode_collapse", "repetition", "template_leakage"}
    msg = {e.kind: e.message for e in events}
    assert "before training: 90%" in msg["never_stops"] and "supervised" in msg["never_stops"]
    assert "lower optim.lr" in msg["mode_collapse"]
    assert mon.observe(_gen_row(30, stop_rate=0.1)) == []  # once per run


def test_never_stops_not_judged_when_references_outrun_the_budget_or_text_prompts():
    mon = HealthMonitor()
    assert mon.observe(_gen_row(5, stop_rate=0.0, reference_length_median=40)) == []  # budget 32 < 40
    assert mon.observe(_gen_row(6, stop_rate=0.0, chat=0, leakage_rate=0.9)) == []  # plain text continuation
    assert [e.kind for e in mon.observe(_gen_row(7, stop_rate=0.0))] == ["never_stops"]


def test_rouge_l_standard_error_by_hand():
    # two pairs: ROUGE-L F1 0.8 ("the cat sat on the mat" vs "the cat on mat") and 1.0 -> mean 0.9, sd 0.1414
    m = reference_scores(["the cat on mat", "abc def"], ["the cat sat on the mat", "abc def"])
    assert m["rouge_l"] == pytest.approx(0.9)
    assert m["rouge_l_se"] == pytest.approx(((0.1 ** 2 + 0.1 ** 2) / 1) ** 0.5 / 2 ** 0.5)
    assert reference_scores(["abc"], ["abc"])["rouge_l_se"] is None  # one pair: no spread to judge by


def _ref_row(step, rouge, se, chrf, **flags):
    return {**_gen_row(step, rouge_l=rouge, rouge_l_se=se, chrf=chrf), **flags}


def test_answers_worse_needs_both_reference_measures_past_their_bars():
    def kinds(after):
        mon = HealthMonitor()
        assert mon.observe(_ref_row(0, 0.24, 0.03, 25.0, before_training=True)) == []
        return [e.kind for e in mon.observe(after)]

    # the benchmark's bad recipe: ROUGE-L 0.24 -> 0.11 (bar 2 x sqrt(0.03^2 + 0.03^2) = 0.085), chrF -20%
    assert kinds(_ref_row(9, 0.11, 0.03, 20.0)) == ["answers_worse"]
    assert kinds(_ref_row(9, 0.17, 0.03, 20.0)) == []  # a fall of 0.07 is inside the prompts' spread
    assert kinds(_ref_row(9, 0.11, 0.03, 23.5)) == []  # chrF fell 6%: the measures disagree
    assert kinds(_ref_row(9, 0.27, 0.03, 26.5)) == []  # better
    assert kinds(_gen_row(9)) == []  # no reference answers: not judged
    mon = HealthMonitor()
    mon.observe(_ref_row(0, 0.24, 0.03, 25.0, before_training=True))
    msg = mon.observe(_ref_row(9, 0.11, 0.03, 20.0))[0].message
    assert "0.240 -> 0.110" in msg and "chrF 25.0 -> 20.0" in msg and "best_or_base" in msg
