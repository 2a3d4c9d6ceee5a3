"""
The published benchmarks' annotations -> data.py's JSONL (video paths come out absolute): MSVD-QA,
MSRVTT-QA, ActivityNet-QA (open-ended; the paper's Table 1) and Video-MME (multiple choice; Table 2).

    python benchmarks.py --benchmark=msvd_qa --annotations=test_qa.json --video_dir=videos --out=msvd.jsonl
    python benchmarks.py --benchmark=activitynet_qa --annotations=test_q.json,test_a.json --video_dir=v --out=anet.jsonl
    python benchmarks.py --benchmark=videomme --annotations=videomme.json --video_dir=videos --out=videomme.jsonl

The converted file is read back with data.load_jsonl, so it passes the same checks as any other.
"""
import json
import os
import re
import sys

from configurator import configure
from data import LETTERS, MAX_REPORTED_ERRORS, DatasetError, load_jsonl, write_jsonl

# ActivityNet-QA "type" ids (github.com/MILVLG/activitynet-qa, dataset/README.md):
# 0-2 are question types, 3-8 answer types of the "free" questions.
ACTIVITYNET_QA_TYPES = ["motion", "spatial relation", "temporal relation", "yes/no",
                        "color", "object", "location", "number", "other"]
BENCHMARKS = ("msvd_qa", "msrvtt_qa", "activitynet_qa", "videomme")
# Video-MME's durations and 12 task types (lmms-eval's VIDEO_TYPE and TASK_CATEGORIES), and its fields kept
VIDEOMME_DURATIONS = ("short", "medium", "long")
VIDEOMME_TASK_TYPES = ("Temporal Perception", "Spatial Perception", "Attribute Perception", "Action Recognition",
                       "Object Recognition", "OCR Problems", "Counting Problem", "Temporal Reasoning",
                       "Spatial Reasoning", "Action Reasoning", "Object Reasoning", "Information Synopsis")
VIDEOMME_KEPT = ("task_type", "duration", "domain", "sub_category", "video_id", "videoID")

def _read_records(path):
    """A JSON list of objects, or JSONL (one object per line)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        records = json.loads(text)
    except json.JSONDecodeError:
        try:
            records = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise DatasetError(f"{path}: neither a JSON list nor JSONL ({err})") from err
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        raise DatasetError(f"{path}: expected a list of JSON objects")
    return records


def _field(rec, key, path, i, types=(str,)):
    if key not in rec or rec[key] is None:
        raise DatasetError(f"{path}: entry {i} (question_id={rec.get('question_id')!r}): missing field {key!r}")
    if isinstance(rec[key], bool) or not isinstance(rec[key], types):
        raise DatasetError(f"{path}: entry {i} (question_id={rec.get('question_id')!r}): "
                           f"field {key!r} has the wrong type: {rec[key]!r}")
    return rec[key]


def _video_path(video_dir, name, ext, where):
    """video_dir/name(.ext), absolute; a name that leads outside video_dir ("../../etc/passwd", "/etc/x") is
    an error naming the entry (`where`): a benchmark's videos are in its video folder."""
    path = os.path.abspath(os.path.join(video_dir, name if name.endswith(ext) else name + ext))
    root = os.path.abspath(video_dir)
    if os.path.commonpath([root, path]) != root:
        raise DatasetError(f"{where}: video name {name!r} leads outside --video_dir={video_dir} (to {path})")
    return path


def _convert_open_qa(qa_json, video_dir, video_ext, int_prefix):
    """MSVD-QA / MSRVTT-QA as used by Video-ChatGPT and VLM-RLAIF: a list of
    {"video_name" | "video_id", "question", "answer", "question_id" | "id"}.
    An integer video_id (the original QA releases) becomes int_prefix + id, e.g.
    7010 -> "video7010". A missing question id falls back to the entry index."""
    rows = []
    for i, rec in enumerate(_read_records(qa_json)):
        if "video_name" in rec:
            name = _field(rec, "video_name", qa_json, i)
        else:
            vid = _field(rec, "video_id", qa_json, i, (str, int))
            name = f"{int_prefix}{vid}" if isinstance(vid, int) else vid
        qid = rec.get("question_id", rec.get("id", i))
        where = f"{qa_json}: entry {i} (question_id={qid!r})"
        if qid is None or isinstance(qid, bool) or not str(qid).strip():
            raise DatasetError(f"{where}: the question id must be a non-empty string or an integer")
        rows.append({"id": str(qid), "video": _video_path(video_dir, name, video_ext, where),
                     "question": _field(rec, "question", qa_json, i),
                     "answer": str(_field(rec, "answer", qa_json, i, (str, int)))})
    return rows


def convert_msvd_qa(qa_json, video_dir, video_ext=".avi"):
    """MSVD-QA: video_name "vid123" -> video_dir/vid123.avi. Returns rows."""
    return _convert_open_qa(qa_json, video_dir, video_ext, "vid")


def convert_msrvtt_qa(qa_json, video_dir, video_ext=".mp4"):
    """MSRVTT-QA: video_name "video7010" -> video_dir/video7010.mp4. Returns rows."""
    return _convert_open_qa(qa_json, video_dir, video_ext, "video")


def convert_activitynet_qa(q_json, a_json, video_dir, video_ext=".mp4"):
    """ActivityNet-QA official split files: q_json is a list of
    {"question", "video_name", "question_id"}, a_json a list of
    {"answer", "type", "question_id"}. Videos are video_dir/v_<video_name>.mp4;
    "category" is the type's name from ACTIVITYNET_QA_TYPES (ids outside 0-8
    are kept as the number, as a string)."""
    answers = {}
    for i, rec in enumerate(_read_records(a_json)):
        qid = str(_field(rec, "question_id", a_json, i, (str, int)))
        if qid in answers:
            raise DatasetError(f"{a_json}: entry {i}: duplicate question_id {qid!r}")
        answers[qid] = (str(_field(rec, "answer", a_json, i, (str, int))), rec.get("type"))
    rows = []
    for i, rec in enumerate(_read_records(q_json)):
        qid = str(_field(rec, "question_id", q_json, i, (str, int)))
        if qid not in answers:
            raise DatasetError(f"{q_json}: entry {i} (question_id={qid!r}): no answer in {a_json}")
        answer, qtype = answers.pop(qid)
        name = _field(rec, "video_name", q_json, i)
        name = name if name.startswith("v_") else "v_" + name
        row = {"id": qid, "video": _video_path(video_dir, name, video_ext, f"{q_json}: entry {i} (question_id={qid!r})"),
               "question": _field(rec, "question", q_json, i), "answer": answer}
        if qtype is not None:
            known = isinstance(qtype, int) and 0 <= qtype < len(ACTIVITYNET_QA_TYPES)
            row["category"] = ACTIVITYNET_QA_TYPES[qtype] if known else str(qtype)
        rows.append(row)
    if answers:
        raise DatasetError(f"{a_json}: {len(answers)} answers have no question in {q_json}, "
                           f"e.g. question_id={next(iter(answers))!r}")
    return rows


def _videomme_records(path):
    """The question records of a Video-MME annotation file, video-level fields merged in: the published
    parquet (lmms-eval's source; needs pyarrow), its export to JSON / JSONL (one row per question), or
    the original release JSON (a list of videos, each with a "questions" list)."""
    if os.fspath(path).endswith(".parquet"):
        try:
            import pyarrow.parquet
        except ImportError:
            raise DatasetError(f"{path}: reading parquet needs pyarrow: pip install pyarrow (or give the JSON "
                               "release, or the parquet exported to JSON)") from None
        return pyarrow.parquet.read_table(path).to_pylist()
    records = []
    for video in _read_records(path):
        questions = video.get("questions")
        if questions is None:
            records.append(video)
        elif isinstance(questions, list) and all(isinstance(q, dict) for q in questions):
            records += [{**{k: v for k, v in video.items() if k != "questions"}, **q} for q in questions]
        else:
            raise DatasetError(f"{path}: video {video.get('video_id')!r}: 'questions' must be a list of objects")
    return records


def convert_videomme(path, video_dir):
    """Video-MME annotations (see _videomme_records) -> rows. Options "A. text" lose their "A. " prefix;
    category = task_type; task_type, duration, domain, sub_category, video_id and videoID are kept.
    A video is video_dir/<videoID or video_id> with .mp4, .MP4 or .mkv, as lmms-eval looks for it.
    Every entry is checked first (fields, an empty options list or option, a duplicate question_id, an
    unknown duration or task type); errors are raised together, naming each entry, and nothing is
    returned. A video not found keeps its .mp4 path (the command line names each such file)."""
    rows, problems, first = [], [], {}
    for i, rec in enumerate(_videomme_records(path)):
        qid, options, answer = rec.get("question_id"), rec.get("options"), rec.get("answer")
        where, found = f"{path}: entry {i} (question_id={qid!r})", []
        for key in ("question", "duration", "task_type"):
            if not isinstance(rec.get(key), str) or not rec[key].strip():
                found.append(f"{key!r} must be a non-empty string, got {rec.get(key)!r}")
        if isinstance(qid, bool) or not isinstance(qid, (str, int)) or str(qid).strip() == "":
            found.append(f"'question_id' must be a non-empty string or an integer, got {qid!r}")
        elif str(qid) in first:
            found.append(f"duplicate question_id (first at entry {first[str(qid)]})")
        if not isinstance(options, list) or not options or not all(isinstance(o, str) and o.strip() for o in options):
            found.append(f"'options' must be a non-empty list of non-empty strings, got {options!r}")
        elif not isinstance(answer, str) or answer.strip() not in LETTERS[:len(options)]:
            found.append(f"answer {answer!r} is not a letter A-{LETTERS[len(options) - 1]}")
        if rec.get("duration") not in (None, *VIDEOMME_DURATIONS) and not found:
            found.append(f"unknown duration {rec['duration']!r} (expected one of {VIDEOMME_DURATIONS})")
        if rec.get("task_type") not in (None, *VIDEOMME_TASK_TYPES) and not found:
            found.append(f"unknown task_type {rec['task_type']!r} (expected one of the {len(VIDEOMME_TASK_TYPES)} "
                         "Video-MME task types)")
        name = rec.get("videoID") or rec.get("video_id")
        if not isinstance(name, str) or not name.strip():
            found.append("no video: 'videoID' and 'video_id' are missing or empty")
        problems += [f"{where}: {problem}" for problem in found]
        if found:
            continue
        first[str(qid)] = i
        try:
            candidates = [_video_path(video_dir, name + ext, ext, where) for ext in (".mp4", ".MP4", ".mkv")]
        except DatasetError as err:
            problems.append(str(err))
            continue
        video = next((c for c in candidates if os.path.isfile(c)), candidates[0])
        # strip "A. " only where the letter matches the position: "U.S. flag" stays whole
        rows.append({"id": str(qid), "video": video, "question": rec["question"], "answer": answer.strip(),
                     "options": [re.sub(rf"^\s*{LETTERS[k]}[.)]\s*", "", o) for k, o in enumerate(options)],
                     "category": rec["task_type"], **{k: rec[k] for k in VIDEOMME_KEPT if k in rec}})
    if problems:
        shown = problems[:MAX_REPORTED_ERRORS] + ([f"... and {len(problems) - MAX_REPORTED_ERRORS} more"]
                                                  if len(problems) > MAX_REPORTED_ERRORS else [])
        raise DatasetError("\n".join(shown), problems)
    return rows


# ----------------------------------------------------------------------------- command line
# defaults, overridable as --key=value
benchmark = ""               # msvd_qa | msrvtt_qa | activitynet_qa | videomme
annotations = ""             # the annotation file; activitynet_qa: "questions.json,answers.json"
video_dir = ""
video_ext = ""               # default: .avi for msvd_qa, .mp4 otherwise
out = ""                     # the JSONL to write


def main(argv):
    configure(argv, globals())
    files = [f for f in annotations.split(",") if f]
    if benchmark not in BENCHMARKS or not files or not video_dir or not out:
        raise SystemExit(f"usage: python benchmarks.py --benchmark={'|'.join(BENCHMARKS)} --annotations=FILE "
                         "--video_dir=DIR --out=FILE.jsonl")
    if len(files) != (2 if benchmark == "activitynet_qa" else 1):
        raise SystemExit(f"--benchmark={benchmark}: expected {2 if benchmark == 'activitynet_qa' else 1} "
                         f"annotation file(s), got {annotations!r}")
    ext = video_ext or (".avi" if benchmark == "msvd_qa" else ".mp4")
    if benchmark == "activitynet_qa":
        rows = convert_activitynet_qa(files[0], files[1], video_dir, ext)
    elif benchmark == "videomme":
        rows = convert_videomme(files[0], video_dir)
    else:
        rows = (convert_msvd_qa if benchmark == "msvd_qa" else convert_msrvtt_qa)(files[0], video_dir, ext)
    # the converted file must pass the same checks as any other, before it replaces anything at `out`
    unchecked = f"{out}.unchecked{os.getpid()}"
    write_jsonl(unchecked, rows)
    try:
        load_jsonl(unchecked)
    except DatasetError as err:
        os.remove(unchecked)
        raise DatasetError(f"{out} not written: the converted rows fail the dataset checks (line N = entry N - 1):\n"
                           + str(err).replace(unchecked, out), err.errors) from None
    os.replace(unchecked, out)
    missing = sorted({r["video"] for r in rows if not os.path.isfile(r["video"])})
    print(f"wrote {len(rows)} samples to {out}")
    if missing:
        print(f"{len(missing)} video file(s) not found (their questions are skipped, and counted, at evaluation):")
        print("\n".join(f"  {path}" for path in missing))


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except DatasetError as err:          # what is wrong, entry by entry, without a traceback
        sys.exit(f"benchmarks.py: {err}")
