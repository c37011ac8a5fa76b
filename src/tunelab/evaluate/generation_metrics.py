"""What generated replies look like, as numbers: stopping, length, diversity, repetition, leakage,
similarity to reference answers.

Loss does not tell a user whether a chat fine-tune got better; the failure modes are in the
outputs: the end-of-turn token never comes (pad = EOS mistakes, EOS unsupervised), every prompt
gets the same bland reply (mode collapse), text loops, role markers leak into replies. Each
measure here is a plain function of reply texts (or token counts), so a test can hand it replies
whose answer is computed by hand.

Units: n-gram measures work on *words* as `words()` cuts them (lowercased runs of letters/digits,
and each punctuation mark alone, so "!!!!" is four units and a punctuation loop counts), which
keeps them independent of the tokenizer; lengths are in model tokens. chrF (sacrebleu) and
ROUGE-L (rouge-score) come from their reference implementations, not written here.
"""

from __future__ import annotations

import math
import re
import statistics
from itertools import combinations

_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)

LOOP_MAX_PERIOD = 12  # longest repeated unit (words) looked for
LOOP_MIN_REPEATS = 3  # the unit repeated this many times in a row ...
LOOP_MIN_UNITS = 8  # ... covering at least this many words


def words(text: str) -> list[str]:
    """Lowercased words and single punctuation marks: the unit of every n-gram measure here."""
    return _WORD.findall(text.lower())


def ngrams(units: list, n: int) -> list[tuple]:
    return [tuple(units[i : i + n]) for i in range(len(units) - n + 1)]


def distinct_n(units: list, n: int) -> float | None:
    """Distinct n-grams / all n-grams inside one reply (Li et al. 2016, per reply); None without an n-gram."""
    grams = ngrams(units, n)
    return len(set(grams)) / len(grams) if grams else None


def repeated_ngram_share(units: list, n: int = 4) -> float | None:
    """Share of the reply's n-grams that repeat an earlier one in the same reply: (all - distinct) / all."""
    grams = ngrams(units, n)
    return (len(grams) - len(set(grams))) / len(grams) if grams else None


def longest_loop(units: list, max_period: int = LOOP_MAX_PERIOD) -> tuple[int, int]:
    """(period, span) of the longest stretch that repeats a unit of `period` words back to back.

    A stretch of period p is a run of positions i with units[i] == units[i + p]; it covers the run
    plus one period. "a b a b a b" gives (2, 6); no repetition gives (0, 0).
    """
    best = (0, 0)
    for p in range(1, min(max_period, len(units) // 2) + 1):
        run = 0
        for i in range(len(units) - p):
            run = run + 1 if units[i] == units[i + p] else 0
            if run and run + p > best[1]:
                best = (p, run + p)
    return best


def has_loop(units: list, min_repeats: int = LOOP_MIN_REPEATS, min_units: int = LOOP_MIN_UNITS) -> bool:
    """A reply is looping when some unit repeats `min_repeats` times in a row over >= `min_units` words."""
    period, span = longest_loop(units)
    return period > 0 and span >= max(min_repeats * period, min_units)


def _gram_set(units: list) -> set:
    return set(ngrams(units, 2)) or set(ngrams(units, 1))


def jaccard(a: set, b: set) -> float:
    """|a & b| / |a | b|; two empty sets are identical (1.0)."""
    return len(a & b) / len(a | b) if a or b else 1.0


def cross_prompt_similarity(replies_units: list[list]) -> float | None:
    """Mean pairwise Jaccard overlap of the replies' word-bigram sets (unigrams for one-word replies).

    Different prompts should get different replies: near 0 for varied answers, 1 when every prompt
    gets the same reply (mode collapse). None with fewer than two replies.
    """
    sets = [_gram_set(u) for u in replies_units]
    pairs = list(combinations(sets, 2))
    return sum(jaccard(a, b) for a, b in pairs) / len(pairs) if pairs else None


def duplicate_share(texts: list[str]) -> float | None:
    """Share of replies whose normalised text equals another reply's."""
    if len(texts) < 2:
        return None
    keys = [" ".join(words(t)) for t in texts]
    return sum(keys.count(k) > 1 for k in keys) / len(keys)


def leaked_markers(raw_reply: str, markers: list[str]) -> list[str]:
    """The role markers / template tokens found inside one reply (decoded with its special tokens)."""
    return [m for m in markers if m and m in raw_reply]


def reference_scores(replies: list[str], references: list[str]) -> dict:
    """chrF (sacrebleu, corpus level, 0-100) and ROUGE-L F1 (rouge-score, mean over pairs, 0-1), with the
    standard error of that mean (`rouge_l_se`: the pairs' sample deviation / sqrt(n); None under 2 pairs),
    which lets health judge a before/after change against the spread of the prompts."""
    from rouge_score import rouge_scorer
    from sacrebleu.metrics import CHRF

    chrf = CHRF().corpus_score(replies, [references]).score
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = [scorer.score(ref, hyp)["rougeL"].fmeasure for hyp, ref in zip(replies, references)]
    se = statistics.stdev(rouge) / math.sqrt(len(rouge)) if len(rouge) >= 2 else None
    return {"chrf": chrf, "rouge_l": sum(rouge) / len(rouge) if rouge else None, "rouge_l_se": se}


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def generation_metrics(replies: list[dict], references: list[str | None] | None = None,
                       markers: list[str] = (), reference_tokens: list[int | None] | None = None) -> dict:
    """Every measure over a set of replies to different prompts.

    `replies`: dicts with `reply` (text without special tokens), `raw` (text with them, the final
    stop token removed), `ids` (optional: its token ids, for loops inside a word), `tokens` (reply
    length in model tokens, stop token excluded) and
    `stopped` (the end-of-turn token came before max_new_tokens). `references`: the reference
    answer per prompt (None where there is none); `reference_tokens`: their lengths in tokens.
    """
    n = len(replies)
    units = [words(r["reply"]) for r in replies]
    lengths = [r["tokens"] for r in replies]
    leaks = [leaked_markers(r.get("raw", r["reply"]), list(markers)) for r in replies]
    found: dict[str, int] = {}
    for hit in leaks:
        for m in hit:
            found[m] = found.get(m, 0) + 1
    out = {
        "n": n,
        "stop_rate": sum(bool(r["stopped"]) for r in replies) / n if n else None,
        "length_mean": statistics.fmean(lengths) if lengths else None,
        "length_median": statistics.median(lengths) if lengths else None,
        "distinct_1": _mean(distinct_n(u, 1) for u in units),
        "distinct_2": _mean(distinct_n(u, 2) for u in units),
        "cross_similarity": cross_prompt_similarity(units),
        "duplicate_share": duplicate_share([r["reply"] for r in replies]),
        "repeated_4gram_share": _mean(repeated_ngram_share(u, 4) for u in units),
        # a loop in words, or in model tokens ("hahahaha" is one word but eight tokens)
        "loop_rate": sum(has_loop(u) or has_loop(r.get("ids") or []) for u, r in zip(units, replies)) / n if n else None,
        "leakage_rate": sum(bool(h) for h in leaks) / n if n else None,
        "leaked_markers": found,
    }
    pairs = [(r["reply"], ref) for r, ref in zip(replies, references or []) if ref is not None]
    if pairs:
        out.update(reference_scores([p[0] for p in pairs], [p[1] for p in pairs]))
        out["references"] = len(pairs)
    ref_lengths = [t for t in (reference_tokens or []) if t is not None]
    if ref_lengths:
        out["reference_length_mean"] = statistics.fmean(ref_lengths)
        out["reference_length_median"] = statistics.median(ref_lengths)
        out["length_ratio"] = out["length_mean"] / out["reference_length_mean"] if out["reference_length_mean"] else None
    return out


# the measures that travel in metrics.jsonl eval rows (as eval_gen_*, eval_gen_sampled_*) and drive health
ROW_KEYS = ("stop_rate", "length_mean", "distinct_1", "distinct_2", "cross_similarity", "repeated_4gram_share",
            "loop_rate", "leakage_rate", "chrf", "rouge_l", "rouge_l_se", "length_ratio")
