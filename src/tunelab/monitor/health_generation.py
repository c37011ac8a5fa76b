"""Health events from what the model generates (the eval_gen_* measures of evaluate/generation.py).

Rows that carry `eval_gen_stop_rate` (an evaluation with generation, or the final generation row)
are judged on their greedy replies; the untouched model's row (`before_training`) is the baseline
quoted in each message and raises nothing itself. Each kind fires once per run. The bars (in
`health.Thresholds`) and why:

- ``never_stops``: fewer than half the replies to conversation prompts ended with the end-of-turn
  token within `max_new_tokens`. A chat model that learned to stop ends nearly every short answer
  (SmolLM2-135M-Instruct: most replies to the benchmark's short-answer prompts); under half means
  the stop was not learned, and the typical causes are the end-of-turn token left unsupervised or
  the pad token equal to EOS (its labels masked out with the padding). Not judged when the
  reference answers' median length is at least `max_new_tokens` (the budget is too short to tell)
  or when the prompts are plain text to continue (no turn to end).
- ``mode_collapse``: mean pairwise word-bigram Jaccard overlap between replies to *different*
  prompts above 0.5. Varied answers overlap a few percent (common phrases); 0.5 means half of
  every reply's bigrams are shared with every other reply: the same answer whatever the question.
- ``repetition``: mean share of repeated 4-grams inside a reply above 0.3, or more than a quarter
  of the replies holding a loop (a unit of up to 12 words repeated 3+ times back to back over 8+
  words). Normal prose repeats almost no 4-gram; lists and code can repeat some, hence 0.3.
- ``template_leakage``: more than 1 reply in 10 contains a special token or a role header of the
  chat template (decoded with special tokens, its final stop token cut). One leak in a large set
  can be a quirk; one in ten is learned.
- ``answers_worse``: where the eval prompts have reference answers, the replies moved away from
  them against the untouched model: ROUGE-L (mean over prompts) fell by more than 2 standard errors
  of the two means combined (sqrt(se_before^2 + se_after^2); unpaired, so conservative: the same
  prompts before and after are positively correlated) AND corpus chrF fell by at least 10%. Both
  reference measures must agree, and the bar scales with the prompts' spread, so 16 prompts of
  noise do not fire it. Measured on SmolLM2 chat SFT (benchmarks/generation_sft.py): a sane recipe
  raised both (ROUGE-L 0.238 -> 0.265, chrF 25.2 -> 26.5); 8 epochs at lr 1e-3 on 24 answers
  stopped, stayed varied and did not loop (none of the four form checks fired) but fell to
  ROUGE-L 0.114 and chrF 19.9: fluent, well-formed and worse, the failure loss curves and form
  checks miss.
"""

from __future__ import annotations

from tunelab.monitor.health import HealthEvent, _num

ADVICE = {
    "never_stops": "check that the end-of-turn token is supervised (tunelab's chat masks include it; the data must be "
                   "conversations, not plain text), that the pad token differs from EOS (padding masks out its labels), "
                   "and that final/generation_config.json stops on the end-of-turn token; if answers are long by "
                   "nature, raise eval.generate.max_new_tokens",
    "mode_collapse": "lower optim.lr, train fewer epochs (keep checkpoint.final: best), train on more varied data "
                     "(tunelab data check --near-dup), or stay nearer the base (method: lora, regularization.l2sp)",
    "repetition": "lower optim.lr or train fewer epochs (an overfit model loops), check the training answers for "
                  "repeated text (tunelab data clean --near-dup) and that answers are not cut mid-way "
                  "(data.overflow: drop); a repetition penalty at inference hides this, it does not fix it",
    "template_leakage": "role markers or template tokens appear inside replies: keep the template text out of the "
                        "messages' content (tunelab data check), train with the model's own chat template and "
                        "supervise assistant turns only, and stop generation at the end-of-turn token",
    "answers_worse": "the replies are further from the reference answers than the untouched model's: lower optim.lr, "
                     "train fewer epochs, keep checkpoint.final: best (or best_or_base, which ships the base when "
                     "nothing beat it), stay nearer the base (method: lora, regularization.l2sp), or add data",
}
GEN_KINDS = tuple(ADVICE)  # the generation kinds, in the order health reports them


def _was(monitor, key: str, fmt: str) -> str:
    v = _num(monitor.gen_before.get(key))
    return f" (before training: {format(v, fmt)})" if v is not None else ""


def generation_events(monitor, row: dict) -> list[HealthEvent]:
    """The generation kinds this row raises (see the module docstring); records the baseline."""
    if row.get("before_training"):
        monitor.gen_before = {k: v for k, v in row.items() if k.startswith("eval_gen_")}
        return []
    t, step, out = monitor.t, int(row.get("step", 0)), []
    g = {k[len("eval_gen_"):]: _num(v) for k, v in row.items() if k.startswith("eval_gen_")}
    chat = bool(g.get("chat"))

    def fire(kind: str, what: str) -> None:
        if kind not in monitor.done:
            monitor.done.add(kind)
            out.append(HealthEvent(step, kind, f"{what} at step {step}: {ADVICE[kind]}"))

    stop, budget, ref = g.get("stop_rate"), g.get("max_new_tokens"), g.get("reference_length_median")
    long_refs = ref is not None and budget is not None and ref >= budget
    if chat and stop is not None and stop < t.gen_min_stop_rate and not long_refs:
        fire("never_stops", f"the model never stops: {stop:.0%} of greedy replies ended with the end-of-turn token "
                            f"within {budget:.0f} new tokens{_was(monitor, 'eval_gen_stop_rate', '.0%')}")
    sim = g.get("cross_similarity")
    if sim is not None and sim > t.gen_max_similarity:
        fire("mode_collapse", f"mode collapse: replies to different prompts overlap {sim:.2f} (mean pairwise bigram "
                              f"Jaccard){_was(monitor, 'eval_gen_cross_similarity', '.2f')}")
    rep, loops = g.get("repeated_4gram_share"), g.get("loop_rate")
    if (rep is not None and rep > t.gen_max_repeated_4grams) or (loops is not None and loops > t.gen_max_loop_rate):
        fire("repetition", f"repetitive replies: {rep or 0:.0%} of 4-grams repeated inside a reply, "
                           f"{loops or 0:.0%} of replies looping{_was(monitor, 'eval_gen_loop_rate', '.0%')} (loops)")
    leak = g.get("leakage_rate")
    if chat and leak is not None and leak > t.gen_max_leakage:
        fire("template_leakage", f"template leakage: {leak:.0%} of replies hold a role marker or template token"
                                 f"{_was(monitor, 'eval_gen_leakage_rate', '.0%')}")
    worse = _answers_worse(t, monitor.gen_before, g)
    if worse:
        fire("answers_worse", worse)
    return out


def _answers_worse(t, before: dict, g: dict) -> str | None:
    """The `answers_worse` message when ROUGE-L and chrF both fell past their bars, else None."""
    r0, r1 = _num(before.get("eval_gen_rouge_l")), g.get("rouge_l")
    se0, se1 = _num(before.get("eval_gen_rouge_l_se")), g.get("rouge_l_se")
    c0, c1 = _num(before.get("eval_gen_chrf")), g.get("chrf")
    if None in (r0, r1, se0, se1, c0, c1) or c0 <= 0:
        return None
    bar = t.gen_reference_drop_se * (se0 ** 2 + se1 ** 2) ** 0.5
    if r0 - r1 > bar and (c0 - c1) / c0 >= t.gen_min_chrf_drop:
        return (f"replies moved away from the reference answers: ROUGE-L {r0:.3f} -> {r1:.3f} (a fall of {r0 - r1:.3f}, "
                f"past {t.gen_reference_drop_se:g} standard errors = {bar:.3f}), chrF {c0:.1f} -> {c1:.1f}")
    return None
