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
from data import LETTERS, DatasetError, load_jsonl, write_jsonl

# ActivityNet-QA "type" ids (github.com/MILVLG/activitynet-qa, dataset/README.md):
# 0-2 are question types, 3-8 answer types of the "free" questions.
ACTIVITYNET_QA_TYPES = ["motion", "spatial relation", "temporal relation", "yes/no",
                        "color", "object", "location", "number", "other"]
BENCHMARKS = ("msvd_qa", "msrvtt_qa", "activitynet_qa", "videomme")

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


def _video_path(video_dir, name, ext):
    return os.path.abspath(os.path.join(video_dir, name if name.endswith(ext) else name + ext))


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
        rows.append({"id": str(qid), "video": _video_path(video_dir, name, video_ext),
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
        row = {"id": qid, "video": _video_path(video_dir, name, video_ext),
               "question": _field(rec, "question", q_json, i), "answer": answer}
        if qtype is not None:
            known = isinstance(qtype, int) and 0 <= qtype < len(ACTIVITYNET_QA_TYPES)
            row["category"] = ACTIVITYNET_QA_TYPES[qtype] if known else str(qtype)
        rows.append(row)
    if answers:
        raise DatasetError(f"{a_json}: {len(answers)} answers have no question in {q_json}, "
                           f"e.g. question_id={next(iter(answers))!r}")
    return rows


def convert_videomme(parquet_or_json, video_dir):
    """Video-MME rows exported as JSON or JSONL (pyarrow/pandas not needed:
    e.g. `pandas.read_parquet(p).to_json(out, orient="records")`). Options
    "A. text" lose their "A. " prefix; category = task_type; duration,
    domain and sub_category are kept. Videos are video_dir/<videoID>.mp4."""
    path = parquet_or_json
    if os.fspath(path).endswith(".parquet"):
        raise DatasetError(f"{path}: export the parquet file to JSON first, e.g. "
                           "pandas.read_parquet(path).to_json('videomme.json', orient='records')")
    rows = []
    for i, rec in enumerate(_read_records(path)):
        # strip "A. " only where the letter matches the position: "U.S. flag" stays whole
        options = [re.sub(rf"^\s*{LETTERS[k]}[.)]\s*", "", str(o))
                   for k, o in enumerate(_field(rec, "options", path, i, (list,)))]
        answer = _field(rec, "answer", path, i).strip()
        if len(answer) != 1 or answer not in LETTERS[:len(options)]:
            raise DatasetError(f"{path}: entry {i} (question_id={rec.get('question_id')!r}): "
                               f"answer {answer!r} is not a letter A-{LETTERS[len(options) - 1]}")
        rows.append({"id": str(_field(rec, "question_id", path, i, (str, int))),
                     "video": _video_path(video_dir, _field(rec, "videoID", path, i), ".mp4"),
                     "question": _field(rec, "question", path, i), "options": options,
                     "answer": answer, "category": _field(rec, "task_type", path, i),
                     "duration": _field(rec, "duration", path, i),
                     **{k: rec[k] for k in ("domain", "sub_category") if k in rec}})
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
        raise SystemExit(f"usage: python data.py --benchmark={'|'.join(BENCHMARKS)} --annotations=FILE "
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
    write_jsonl(out, rows)
    load_jsonl(out)  # the converted file must pass the same checks as any other
    missing = sum(not os.path.isfile(r["video"]) for r in rows)
    print(f"wrote {len(rows)} samples to {out}" + (f"; {missing} of their videos are not in {video_dir}" if missing else ""))


if __name__ == "__main__":
    main(sys.argv[1:])
