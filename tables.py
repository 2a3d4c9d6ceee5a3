"""
The paper-shaped tables of eval.py's results dicts: one run by category, duration and overall (Table 2
for Video-MME, one dataset's row of Table 1 for open-ended QA), or two runs side by side with the delta.
"""
import os

# Table order of the paper's Video-MME categories and durations; other names follow, sorted.
VIDEOMME_CATEGORIES = [
    "Temporal Perception", "Spatial Perception", "Attribute Perception", "Action Recognition",
    "Object Recognition", "OCR Problems", "Counting Problem", "Temporal Reasoning",
    "Spatial Reasoning", "Action Reasoning", "Object Reasoning", "Information Synopsis"]
DURATIONS = ["short", "medium", "long"]


def table_order(names, known):
    """Names in the paper's table order (those in `known`) first, then the others sorted."""
    return sorted(names, key=lambda name: (known.index(name) if name in known else len(known), name))


def table_rows(results):
    """[(label, metrics)]: categories, then durations, then the overall row."""
    rows = list(results.get("by_category", {}).items()) + list(results.get("by_duration", {}).items())
    return rows + [("Overall", results)]


def format_table(header, rows):
    """header: list[str], rows: list[list[str]] -> str; first column left-aligned, others right."""
    widths = [max(len(str(row[i])) for row in [header] + rows) for i in range(len(header))]
    lines = []
    for row in [header] + rows:
        cells = [str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def print_results(results, title=""):
    """Print one results dict as a small table: rows = categories (+ durations) + overall."""
    is_open = results["task"] == "open"
    header = ["category", "n", "accuracy"] + (["score"] if is_open else [])
    rows = [[label, m["n"], f"{100 * m['accuracy']:.1f}%"] + ([f"{m['score']:.2f}"] if is_open else [])
            for label, m in table_rows(results)]
    notes = [f"{label}: {results[key]}" for key, label in (("skipped_videos", "skipped videos"), ("unanswered", "unanswered"),
             ("invalid", "invalid judge verdicts"), ("unclear", "verdicts neither yes nor no")) if key in results]
    print((f"{title}\n" if title else "") + format_table(header, rows) + "\n" + "   ".join(notes))


def format_comparison(a, b, names=("A", "B")):
    """Two results dicts of one task side by side, shaped like the paper's Table 2 (mc, exact:
    accuracy, delta in points) or one dataset of Table 1 (open: accuracy and score). delta = B - A,
    the change from A to B: format_comparison(before, after), or (VLM-RLAIF, Oracle-RLAIF) for the
    paper's sign. Rows: categories, durations, overall; a row missing on one side shows "-"."""
    if a["task"] != b["task"]:
        raise ValueError(f"cannot compare a {a['task']!r} result with a {b['task']!r} result")
    metrics = [("accuracy", 100.0, "{:.1f}%", "{:+.1f}")]    # (key, scale, format, delta format)
    if a["task"] == "open":
        metrics.append(("score", 1.0, "{:.2f}", "{:+.2f}"))
    rows_a, rows_b = dict(table_rows(a)), dict(table_rows(b))
    labels = []
    for key, known in (("by_category", VIDEOMME_CATEGORIES), ("by_duration", DURATIONS)):
        labels += table_order(set(a.get(key, {})) | set(b.get(key, {})), known)
    labels.append("Overall")

    suffix = [""] if len(metrics) == 1 else [" acc", " score"]
    header = (["category"] + [f"{names[0]}{s}" for s in suffix] + [f"{names[1]}{s}" for s in suffix]
              + [f"delta{s}" for s in suffix])
    rows = []
    for label in labels:
        ma, mb = rows_a.get(label), rows_b.get(label)
        cells_a = [fmt.format(scale * ma[key]) if ma else "-" for key, scale, fmt, _ in metrics]
        cells_b = [fmt.format(scale * mb[key]) if mb else "-" for key, scale, fmt, _ in metrics]
        deltas = [dfmt.format(scale * (mb[key] - ma[key])) if ma and mb else "-"
                  for key, scale, _, dfmt in metrics]
        rows.append([label] + cells_a + cells_b + deltas)
    notes = [f"delta = {names[1]} - {names[0]}" + (" (accuracy in points)" if len(metrics) == 1 else
                                                   " (accuracy in points, score in score units)")]
    for key in ("n", "skipped_videos", "unanswered", "invalid", "unclear"):
        if key in a or key in b:
            notes.append(f"{key}: {names[0]} {a.get(key, '-')}, {names[1]} {b.get(key, '-')}")
    return format_table(header, rows) + "\n" + "\n".join(notes)


def comparison_names(a, b):
    """Column names for --compare: the checkpoints' folder names when they differ, else A and B."""
    names = [os.path.basename(os.path.normpath(r.get("checkpoint", ""))) for r in (a, b)]
    return tuple(names) if all(names) and names[0] != names[1] else ("A", "B")
