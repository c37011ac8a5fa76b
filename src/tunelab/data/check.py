"""`tunelab data check`: will training accept this file, and what is in it?

The file is read exactly as `data clean` reads it (tunelab.data.clean.load_rows), and the report's
curation numbers come from the same rules (tunelab.data.curate), so `check` says what `clean`
would drop. One difference, on purpose: a row that training refuses (an empty text, an empty or
missing assistant turn) makes `check` exit 2 like training does, at the first such row, with how
many there are in all; `tunelab data clean` drops them.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from tunelab.data.clean import CountTokens, Loaded, check_filters, curate_loaded, load_rows, token_counts
from tunelab.data.curate import EXAMPLES_PER_REASON, Filters, label_conflicts, leaked, percentiles
from tunelab.data.readers import DroppableRowError

LOW_ASSISTANT_SHARE = 0.2


def refuse_unusable(loaded: Loaded) -> None:
    """Raise the first row training would refuse, its message saying how many such rows there are."""
    items = sorted(item for errors in loaded.unusable.values() for item in errors)
    if not items:
        return
    first = items[0][2]
    note = f"1 of {len(items)} rows that training refuses" if len(items) > 1 else "training refuses such rows"
    raise DroppableRowError(f"{first.message} ({note}; `tunelab data clean` drops them)", reason=first.reason,
                            file=first.file, line=first.line, field=first.field, where=first.where)


def chat_stats(conversations: list[list[list]], count_tokens: CountTokens | None = None) -> dict:
    """Turns, roles and how much of the text is trained (assistant) text, over all conversations."""
    convs = [c for per_row in conversations for c in per_row]
    roles = Counter(m.role for c in convs for m in c)
    total = sum(len(m.content) for c in convs for m in c)
    trained = sum(len(m.content) for c in convs for m in c if m.trained())
    stats = {
        "conversations": len(convs),
        "messages_per_conversation": percentiles([len(c) for c in convs]),
        "roles": {r: roles[r] for r in ("system", "user", "assistant") if roles[r]},
        "with_system_prompt": sum(c[0].role == "system" for c in convs),
        "multi_turn": sum(sum(m.role == "assistant" for m in c) > 1 for c in convs),
        "assistant_char_share": round(trained / total, 4) if total else 0.0,
    }
    if count_tokens is not None and convs:
        all_tokens = sum(count_tokens([m.content for c in convs for m in c]))
        trained_tokens = sum(count_tokens([m.content for c in convs for m in c if m.trained()] or [""]))
        stats["assistant_token_share"] = round(trained_tokens / all_tokens, 4) if all_tokens else 0.0
    return stats


def file_report(loaded: Loaded, filters: Filters, count_tokens: CountTokens | None = None,
                train_keys: set[str] | None = None) -> dict:
    """The report of one file: sizes, lengths, duplicates, conflicts, leakage (eval), labels or
    chat statistics, and what `data clean` with the same options would drop."""
    rows = loaded.rows
    keys = [r.key for r in rows]
    curated, clean = curate_loaded(loaded, filters, count_tokens, train_keys)
    chars = sorted(len(r.text) for r in rows)
    report = {"file": str(loaded.path), "task": loaded.task, "format": loaded.fmt, "rows": len(rows)}
    if loaded.task == "classification":
        report["labels"] = dict(sorted(Counter(r.label for r in rows).items()))
    conflicts = label_conflicts(keys, [r.label for r in rows])
    report.update({
        "duplicate_texts": len(keys) - len(set(keys)),  # rows repeating an earlier row (normalised)
        "label_conflicts": len(conflicts),
        "chars_median": chars[len(chars) // 2], "chars_max": chars[-1], "chars": percentiles(chars),
    })
    tokens = token_counts(loaded, count_tokens)
    if tokens is not None:
        report["tokens"] = percentiles(tokens)
    if train_keys is not None:
        leaks = leaked(train_keys, keys)
        report["leakage"] = len(leaks)
        report["leakage_examples"] = [rows[i].source for i in leaks[:EXAMPLES_PER_REASON]]
    if loaded.task == "chat":
        report["chat"] = chat_stats(loaded.conversations, count_tokens)
    report["clean"] = {"would_keep": clean["kept"], "would_drop": clean["dropped"], "examples": clean["examples"]}
    report["hints"] = hints(report)
    return report


def hints(report: dict) -> list[str]:
    """Plain-language notes on what the numbers mean for training."""
    out = []
    if report["duplicate_texts"]:
        out.append(f"{report['duplicate_texts']} rows repeat an earlier row: they weigh double in training and can "
                   "inflate eval scores; `tunelab data clean` keeps the first copy")
    if report["label_conflicts"]:
        out.append(f"{report['label_conflicts']} rows share a text with a row of another label: the model cannot "
                   "learn both; `tunelab data clean` drops every copy")
    if report.get("leakage"):
        out.append(f"{report['leakage']} eval rows also appear in the training file: eval scores will be optimistic")
    share = report.get("chat", {}).get("assistant_char_share")
    if share is not None and share < LOW_ASSISTANT_SHARE:
        out.append(f"assistant text is {share:.0%} of all text: the loss covers only that part, so the data teaches "
                   "less than its size suggests")
    return out


def check_files(file: str | Path, *, eval_file: str | Path | None = None, task: str = "auto",
                text_column: str = "text", label_column: str = "label", filters: Filters = Filters(),
                count_tokens: CountTokens | None = None) -> dict:
    """Report on FILE (and EVAL_FILE against it); exit-2 errors for what training would refuse."""
    check_filters(filters, count_tokens)
    train = load_rows(file, task=task, text_column=text_column, label_column=label_column)
    refuse_unusable(train)
    report = file_report(train, filters, count_tokens)
    if eval_file is not None:
        names = train.labels() if train.task == "classification" else None
        evaluation = load_rows(eval_file, task=train.task, text_column=text_column, label_column=label_column,
                               label_names=names)
        refuse_unusable(evaluation)
        report["eval"] = file_report(evaluation, filters, count_tokens, train_keys={r.key for r in train.rows})
    return report
