"""
Data for Oracle-RLAIF: video decoding, the dataset format, converters from the
published benchmark annotations, and the synthetic video-QA task that is the
embedded default (no downloads).

The dataset format is JSONL, one sample per line:
    {"id": "42", "video": "videos/a.mp4", "question": "...", "answer": "...",
     "options": [...], "category": "...", "duration": "..."}
"options", "category" and "duration" are optional; any other key is kept.
With "options" the sample is multiple choice and "answer" is a letter.

    python data.py synth --out=data/synth
    python data.py convert --format=msvd_qa --annotations=test_qa.json --video_dir=videos --out=msvd.jsonl
"""

import json
import os
import re

import numpy as np
import torch
import torch.nn.functional as F

try:  # decord is the paper's decoder; it has x86-64 wheels only, PyAV is the fallback
    import decord
    HAVE_DECORD = True
except ImportError:
    decord = None
    HAVE_DECORD = False
import av
from tqdm import tqdm

MAX_REPORTED_ERRORS = 10  # load_jsonl lists this many problems, then "... and N more"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# ActivityNet-QA "type" ids (github.com/MILVLG/activitynet-qa, dataset/README.md):
# 0-2 are question types, 3-8 answer types of the "free" questions.
ACTIVITYNET_QA_TYPES = ["motion", "spatial relation", "temporal relation", "yes/no",
                        "color", "object", "location", "number", "other"]

# Synthetic task. RGB values are far apart (>= 140 in RGB distance) so that
# colours survive yuv420p compression and a 32x32 resize.
SYNTH_COLOURS = ["red", "green", "blue", "yellow", "white", "purple"]
SYNTH_RGB = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (30, 70, 250),
             "yellow": (240, 220, 40), "white": (240, 240, 240), "purple": (180, 50, 210)}
SYNTH_CATEGORIES = ["colour", "count", "position", "order"]
SYNTH_ANSWERS = {"colour": SYNTH_COLOURS, "count": ["one", "two", "three"],
                 "position": ["left", "right", "top", "bottom"], "order": SYNTH_COLOURS}
SYNTH_EXTRA_DISTRACTORS = {"count": ["four"]}  # count has 3 answers; MC needs 4 options
SYNTH_QUESTIONS = {
    "colour": ["what colour is the square ?", "what is the colour of the square ?"],
    "count": ["how many squares are there ?", "how many squares can you see ?"],
    "position": ["where is the square ?", "in which part of the frame is the square ?"],
    "order": ["which colour appears first ?", "what colour is the first square to appear ?"],
}
SYNTH_FPS = 8
SYNTH_X264 = {"qp": "0"}   # lossless: x264's lossy decisions vary run to run (measured: 10 of 40
                           # re-encodings of one clip at crf 18 differed in pixels), lossless ones do not
SYNTH_VERSION = 3  # bump when the generator changes, so cached data is regenerated


class VideoError(Exception):
    """A video could not be read. The message names the path and the reason."""


class DatasetError(ValueError):
    """A dataset file is malformed. The message is "FILE:LINE: what is wrong"
    (one problem per line when there are several; `.errors` holds them all)."""

    def __init__(self, message, errors=None):
        super().__init__(message)
        self.errors = errors or [message]


# -----------------------------------------------------------------------------
# video decoding

def _sample_indices(n, num_frames):
    """Uniform sampling as in the paper: round(linspace(0, n-1, num_frames)).
    With fewer than num_frames frames in the video, indices repeat."""
    return np.linspace(0, n - 1, num_frames).round().astype(np.int64)


def _read_decord(path, num_frames):
    vr = decord.VideoReader(path, ctx=decord.cpu(0))
    n = len(vr)
    if n == 0:
        raise VideoError(f"{path}: video has zero frames")
    return vr.get_batch(_sample_indices(n, num_frames).tolist()).asnumpy()


def _read_pyav(path, num_frames):
    # Decode sequentially (exact, no seeking) and convert only the wanted frames
    # to RGB, so that a long video never sits in memory. The frame count in the
    # header can be missing (0) or wrong: then the first pass counts the frames
    # and a second pass picks them.
    n = None
    for _ in range(2):
        with av.open(path) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            if n is None:
                n = stream.frames
            wanted = _sample_indices(n, num_frames) if n > 0 else []
            wanted_set, picked, decoded = set(int(i) for i in wanted), {}, 0
            for frame in container.decode(stream):
                if decoded in wanted_set:
                    picked[decoded] = frame.to_ndarray(format="rgb24")
                decoded += 1
        if decoded == 0:
            raise VideoError(f"{path}: video has zero frames")
        if decoded == n:
            return np.stack([picked[int(i)] for i in wanted])
        n = decoded
    raise VideoError(f"{path}: the frame count differs between two decodes")


def load_video(path, num_frames, backend="auto"):
    """Decodes num_frames frames sampled uniformly over the whole video.

    path: str or PathLike; backend: "auto" (decord if importable, else PyAV),
    "decord" or "pyav". Returns a uint8 tensor (num_frames, H, W, 3), RGB.
    Raises VideoError (naming the path) for a missing, empty, corrupt or
    frameless file; the decoders' own exceptions are chained as the cause.
    """
    path = os.fspath(path)
    if backend == "auto":
        backend = "decord" if HAVE_DECORD else "pyav"
    if backend not in ("decord", "pyav"):
        raise ValueError(f"unknown video backend {backend!r}")
    if backend == "decord" and not HAVE_DECORD:
        # not a VideoError: a trainer that skips bad videos must not skip them all
        raise ImportError("decord is not installed: use backend='pyav' or 'auto'")
    if not os.path.isfile(path):
        raise VideoError(f"{path}: file not found")
    if os.path.getsize(path) == 0:
        raise VideoError(f"{path}: file is empty")
    try:
        frames = _read_decord(path, num_frames) if backend == "decord" else _read_pyav(path, num_frames)
    except VideoError:
        raise
    except Exception as err:  # decord raises RuntimeError/DECORDError, PyAV FFmpegError and others
        reason = (str(err).strip().splitlines() or [""])[0]  # decord appends a stack trace
        raise VideoError(f"{path}: cannot decode video ({type(err).__name__}: {reason})") from err
    return torch.from_numpy(np.ascontiguousarray(frames))


# -----------------------------------------------------------------------------
# the JSONL dataset format

def stack_frames(videos):
    """list of B uint8 (T, H, W, 3) -> uint8 (B, T, H', W', 3) for one encode_video call.
    Videos of one size are stacked as they are. Mixed sizes are centre-cropped to squares and resized
    to the largest square: what the policy's preprocessing (short side resize, centre crop) would make
    of each anyway, and one call per batch keeps the ranks of a sharded model in step."""
    if all(v.shape == videos[0].shape for v in videos):
        return torch.stack(videos)
    side = max(min(v.shape[1:3]) for v in videos)
    squares = []
    for v in videos:
        height, width = v.shape[1:3]
        crop = min(height, width)
        top, left = (height - crop) // 2, (width - crop) // 2
        pixels = v[:, top:top + crop, left:left + crop].permute(0, 3, 1, 2).float()
        if crop != side:
            pixels = F.interpolate(pixels, size=(side, side), mode="bilinear", antialias=True, align_corners=False)
        squares.append(pixels.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1))
    return torch.stack(squares)


def read_videos(samples, num_frames):
    """Decode the videos of a batch of samples; one that cannot be read does not stop the batch.
    -> (frames uint8 (B', T, H, W, 3) or None when none loaded, the B' samples that loaded,
    [(sample, VideoError)] for those that did not: the caller reports and counts them)."""
    videos, loaded, failures = [], [], []
    for sample in samples:
        try:
            videos.append(load_video(sample["video"], num_frames))
            loaded.append(sample)
        except VideoError as err:
            failures.append((sample, err))
    return (stack_frames(videos) if videos else None), loaded, failures


def _check_sample(row, base_dir):
    """Validates one parsed line; returns (sample, problems). The sample is a
    copy with "id" as str, "video" absolute, and an MC "answer" as a letter."""
    if not isinstance(row, dict):
        return None, [f"expected a JSON object, got {type(row).__name__}"]
    problems = []
    sample = dict(row)
    for key in ("id", "video", "question", "answer"):
        if key not in row:
            problems.append(f"missing required field {key!r}")
    sid = row.get("id")
    if "id" in row:
        if isinstance(sid, bool) or not isinstance(sid, (str, int)) or str(sid) == "":
            problems.append(f"'id' must be a non-empty string or an integer, got {sid!r}")
        else:
            sample["id"] = str(sid)
    for key in ("video", "question", "answer"):
        if key in row and (not isinstance(row[key], str) or not row[key].strip()):
            problems.append(f"{key!r} must be a non-empty string, got {row[key]!r}")
    for key in ("category", "duration"):
        if key in row and not isinstance(row[key], str):
            problems.append(f"{key!r} must be a string, got {row[key]!r}")
    if "options" in row:
        problems += _check_options(row["options"], row.get("answer"), sample)
    if not problems:
        sample["video"] = os.path.abspath(os.path.join(base_dir, os.path.expanduser(row["video"])))
    return sample, problems


def _check_options(options, answer, sample):
    """Multiple choice: 2-26 distinct non-empty strings. "answer" is either a
    capital letter within range, or exactly one option's text, which is then
    replaced by its letter (a letter always wins over an option that reads "B")."""
    if not isinstance(options, list) or not 2 <= len(options) <= len(LETTERS):
        return [f"'options' must be a list of 2 to {len(LETTERS)} strings, got {options!r}"]
    if not all(isinstance(o, str) and o.strip() for o in options):
        return [f"'options' must all be non-empty strings, got {options!r}"]
    if len(set(options)) != len(options):
        return [f"'options' contains duplicates: {options!r}"]
    if not isinstance(answer, str):
        return []  # already reported
    if len(answer) == 1 and answer in LETTERS:
        if LETTERS.index(answer) >= len(options):
            return [f"answer {answer!r} is out of range for {len(options)} options"]
        return []
    if answer in options:
        sample["answer"] = LETTERS[options.index(answer)]
        return []
    return [f"answer {answer!r} is neither a letter A-{LETTERS[len(options) - 1]} nor one of the options"]


def load_jsonl(path):
    """Reads and validates a dataset file; returns a list of sample dicts.

    The whole file is checked and every problem reported at once as one
    DatasetError ("FILE:LINE: ..." per problem, first one first). Blank lines
    are skipped; nothing else is ever dropped. Relative video paths are
    resolved against the file's directory. Videos are not opened here.
    """
    path = os.fspath(path)
    base_dir = os.path.dirname(os.path.abspath(path))
    samples, errors, first_line_of_id = [], [], {}
    with open(path, "rb") as f:  # bytes, so that bad UTF-8 is reported with its line number
        for lineno, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                errors.append(f"{path}:{lineno}: not valid UTF-8 ({err.reason})")
                continue
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                errors.append(f"{path}:{lineno}: invalid JSON ({err.msg} at column {err.colno})")
                continue
            sample, problems = _check_sample(row, base_dir)
            errors += [f"{path}:{lineno}: {p}" for p in problems]
            if problems:
                continue
            if sample["id"] in first_line_of_id:
                errors.append(f"{path}:{lineno}: duplicate id {sample['id']!r} "
                              f"(first seen on line {first_line_of_id[sample['id']]})")
                continue
            first_line_of_id[sample["id"]] = lineno
            samples.append(sample)
    if not errors and not samples:
        errors.append(f"{path}:1: the file has no samples")
    if errors:
        shown = errors[:MAX_REPORTED_ERRORS]
        if len(errors) > len(shown):
            shown.append(f"... and {len(errors) - len(shown)} more errors")
        raise DatasetError("\n".join(shown), errors)
    return samples


def write_jsonl(path, rows):
    """Writes rows (dicts) one per line, UTF-8. Atomic: a reader never sees a
    half-written file (written to a temporary name, then renamed)."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# converters from the published annotation formats (video paths come out absolute)

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


# -----------------------------------------------------------------------------
# synthetic video QA: coloured squares on a dark, noisy background
#
# The downstream model pools CLIP patch features Video-ChatGPT style: T
# temporal tokens (mean over the patches of a frame) and S spatial tokens
# (mean over frames of a patch). Each category is built to survive that:
# colour and count are in every token, position is in the spatial tokens, and
# order is in the temporal tokens (which colours a frame contains). Motion
# direction is not used: patch-mean pooling erases it.

def split_words(text):
    """Lowercase words with punctuation split off: "How many?" -> ["how", "many", "?"]."""
    return re.findall(r"[a-z0-9]+|[^\sa-z0-9]", text.lower())


def synthetic_vocab():
    """Every word of a synthetic question, answer or multiple-choice option,
    plus the option letters ("a".."d", lowercased like everything else). Sorted."""
    words = set(LETTERS[:4].lower())
    for questions in SYNTH_QUESTIONS.values():
        for q in questions:
            words.update(split_words(q))
    for cat in SYNTH_CATEGORIES:
        words.update(SYNTH_ANSWERS[cat] + SYNTH_EXTRA_DISTRACTORS.get(cat, []))
    return sorted(words)


def _place(rng, size, sides, gap):
    """Top-left corners (y, x) for squares of the given sides, fully inside the
    frame and at least gap px apart (so that they never merge after a resize)."""
    for _ in range(1000):
        corners = [rng.integers(0, size - s + 1, size=2) for s in sides]
        if all(a[0] + sa + gap <= b[0] or b[0] + sb + gap <= a[0] or
               a[1] + sa + gap <= b[1] or b[1] + sb + gap <= a[1]
               for i, (a, sa) in enumerate(zip(corners, sides))
               for b, sb in zip(corners[i + 1:], sides[i + 1:])):
            return corners
    raise RuntimeError(f"cannot place {len(sides)} squares in a {size}px frame")


def _make_synthetic(rng, category, answer, num_frames, size):
    """make_synthetic_video, plus hard distractors for the multiple-choice form."""
    T, S = num_frames, size
    if T < 4 or S < 32:
        raise ValueError(f"synthetic videos need >= 4 frames of >= 32 px, got {T} frames of {S} px")
    if category not in SYNTH_CATEGORIES:
        raise ValueError(f"unknown synthetic category {category!r}")
    answers = SYNTH_ANSWERS[category]
    answer = answers[rng.integers(len(answers))] if answer is None else answer
    if answer not in answers:
        raise ValueError(f"{answer!r} is not a {category} answer")
    # near-black background: a random dark tint plus static grey noise
    background = 8 + rng.integers(0, 30, size=3) + rng.normal(0, 4, size=(S, S, 1))
    frames = np.repeat(np.clip(background, 0, 255).astype(np.uint8)[None], T, axis=0)
    def rgb(name):  # jittered a little, still far from every other colour
        return np.clip(np.array(SYNTH_RGB[name]) + rng.integers(-12, 13, size=3), 0, 255)
    def paint(t, y, x, side, colour):
        frames[t, y:y + side, x:x + side] = colour
    hard = []
    if category == "colour":  # one square, 8-12 px at 64, drifting by up to 1 px/frame
        side = int(rng.integers(S // 8, 3 * S // 16 + 1))
        (y, x), (vy, vx), colour = _place(rng, S, [side], 0)[0], rng.integers(-1, 2, size=2), rgb(answer)
        for t in range(T):
            paint(t, int(np.clip(y + vy * t, 0, S - side)), int(np.clip(x + vx * t, 0, S - side)), side, colour)
    elif category == "count":  # 1-3 squares of one colour, 10-14 px at 64, 4 px apart
        sides = [int(s) for s in rng.integers(5 * S // 32, 7 * S // 32 + 1, size=answers.index(answer) + 1)]
        colour = rgb(SYNTH_COLOURS[rng.integers(len(SYNTH_COLOURS))])
        for (y, x), side in zip(_place(rng, S, sides, S // 16), sides):
            for t in range(T):
                paint(t, y, x, side, colour)
    elif category == "position":  # centre within S/4 of its side, within S/8 of the middle line
        side = int(rng.integers(3 * S // 16, S // 4 + 1))
        along = int(rng.integers(0, S // 4 - side // 2 + 1))  # distance of the square from its side
        across = S // 2 - side // 2 + int(rng.integers(-S // 8, S // 8 + 1))
        far = S - side - along
        y, x = {"left": (across, along), "right": (across, far),
                "top": (along, across), "bottom": (far, across)}[answer]
        colour = rgb(SYNTH_COLOURS[rng.integers(len(SYNTH_COLOURS))])
        for t in range(T):
            paint(t, y, x, side, colour)
    elif category == "order":
        # The first square (the answer's colour) is there from frame 0 to the
        # end; the second appears in the second half (frame T/2 .. 3T/4 - 1)
        # and stays, so the last frames show both.
        others = [c for c in SYNTH_COLOURS if c != answer]
        second = others[rng.integers(len(others))]
        sides = [int(s) for s in rng.integers(S // 8, 3 * S // 16 + 1, size=2)]  # 8-12 px at 64
        (y1, x1), (y2, x2) = _place(rng, S, sides, S // 16)
        appear = int(rng.integers(T // 2, max(T // 2, T - 1 - T // 4) + 1))
        c1, c2 = rgb(answer), rgb(second)
        for t in range(T):
            paint(t, y1, x1, sides[0], c1)
            if t >= appear:
                paint(t, y2, x2, sides[1], c2)
        hard = [second]
    question = SYNTH_QUESTIONS[category][rng.integers(len(SYNTH_QUESTIONS[category]))]
    return frames, question, answer, hard


def make_synthetic_video(rng, category, answer=None, num_frames=8, size=64):
    """One synthetic clip. rng: numpy Generator; category: one of
    SYNTH_CATEGORIES; answer: forced answer word (random if None).
    Returns (frames uint8 (num_frames, size, size, 3), question str, answer str)."""
    frames, question, answer, _ = _make_synthetic(rng, category, answer, num_frames, size)
    return frames, question, answer


def _write_mp4(path, frames):
    """uint8 (T, H, W, 3) -> lossless H.264 mp4 (yuv420p), so the decoded pixels are the same on
    every run and machine; the rename keeps a killed run from leaving half a file."""
    tmp = f"{path}.tmp{os.getpid()}.mp4"
    with av.open(tmp, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=SYNTH_FPS, options=SYNTH_X264)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)


def _balanced_plan(n, rng):
    """n (category, answer) pairs: categories take turns, answers cycle within
    a category, then the order is shuffled. Counts differ by at most one."""
    plan = []
    for i in range(n):
        category = SYNTH_CATEGORIES[i % len(SYNTH_CATEGORIES)]
        answers = SYNTH_ANSWERS[category]
        plan.append((category, answers[(i // len(SYNTH_CATEGORIES)) % len(answers)]))
    return [plan[j] for j in rng.permutation(n)]


def _multiple_choice(row, hard, rng):
    """The same sample with 4 options: the answer, the hard distractors (the
    other colour of an order clip), then random words of the category."""
    pool = SYNTH_ANSWERS[row["category"]] + SYNTH_EXTRA_DISTRACTORS.get(row["category"], [])
    rest = [w for w in pool if w != row["answer"] and w not in hard]
    distractors = hard + [str(w) for w in rng.choice(rest, 3 - len(hard), replace=False)]
    options = [str(w) for w in rng.permutation([row["answer"]] + distractors)]
    return dict(row, options=options, answer=LETTERS[options.index(row["answer"])])


def make_synthetic_dataset(out_dir, num_train=2000, num_eval=300, seed=0, num_frames=8, size=64):
    """Writes out_dir/videos/*.mp4, train.jsonl, eval.jsonl (open-ended, one-word
    answers) and eval_mc.jsonl (the eval questions with 4 options, answer = letter).
    Deterministic in seed; video paths in the JSONL are relative to out_dir.
    Returns {"train": path, "eval": path, "eval_mc": path} right away when
    out_dir already holds complete data for the same parameters: meta.json is
    written last, so its presence means the run finished."""
    params = {"version": SYNTH_VERSION, "num_train": num_train, "num_eval": num_eval,
              "seed": seed, "num_frames": num_frames, "size": size}
    paths = {split: os.path.join(out_dir, f"{split}.jsonl") for split in ("train", "eval", "eval_mc")}
    meta_path = os.path.join(out_dir, "meta.json")
    video_names = [f"{split}_{i:06d}.mp4" for split, n in (("train", num_train), ("eval", num_eval))
                   for i in range(n)]
    if os.path.isfile(meta_path):
        with open(meta_path) as f:
            same = json.load(f) == params
        if same and all(map(os.path.isfile, paths.values())) and \
                set(video_names) <= set(os.listdir(os.path.join(out_dir, "videos"))):
            return paths
        os.remove(meta_path)  # parameters changed or data incomplete: regenerate
    os.makedirs(os.path.join(out_dir, "videos"), exist_ok=True)
    rows = {"train": [], "eval": [], "eval_mc": []}
    with tqdm(total=num_train + num_eval, desc="synthetic videos", disable=None) as bar:
        for split_id, (split, n) in enumerate((("train", num_train), ("eval", num_eval))):
            plan = _balanced_plan(n, np.random.default_rng([seed, split_id, 0]))
            for i, (category, answer) in enumerate(plan):
                # one generator per clip: a clip does not depend on the ones before it
                rng = np.random.default_rng([seed, split_id, 1, i])
                frames, question, answer, hard = _make_synthetic(rng, category, answer, num_frames, size)
                video = f"videos/{split}_{i:06d}.mp4"
                _write_mp4(os.path.join(out_dir, video), frames)
                row = {"id": f"{split}-{i:06d}", "video": video, "question": question,
                       "answer": answer, "category": category}
                rows[split].append(row)
                if split == "eval":
                    rows["eval_mc"].append(_multiple_choice(row, hard, np.random.default_rng([seed, 2, i])))
                bar.update()
    for split, path in paths.items():
        write_jsonl(path, rows[split])
    tmp = f"{meta_path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(params, f)
    os.replace(tmp, meta_path)
    return paths


# -----------------------------------------------------------------------------

if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("synth", help="generate the synthetic video-QA dataset")
    p.add_argument("--out", default="data/synth")
    p.add_argument("--num_train", type=int, default=2000)
    p.add_argument("--num_eval", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_frames", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    p = sub.add_parser("convert", help="convert published annotations to this project's JSONL")
    p.add_argument("--format", required=True, choices=["msvd_qa", "msrvtt_qa", "activitynet_qa", "videomme"])
    p.add_argument("--annotations", required=True, nargs="+",
                   help="annotation file; for activitynet_qa the question file then the answer file")
    p.add_argument("--video_dir", required=True)
    p.add_argument("--video_ext", default=None, help="default: .avi for msvd_qa, .mp4 otherwise")
    p.add_argument("--out", required=True)
    args = parser.parse_args()

    if args.command == "synth":
        paths = make_synthetic_dataset(args.out, args.num_train, args.num_eval, args.seed,
                                       args.num_frames, args.size)
        print("\n".join(f"{split}: {path}" for split, path in paths.items()))
    else:
        files = args.annotations
        ext = args.video_ext or (".avi" if args.format == "msvd_qa" else ".mp4")
        if len(files) != (2 if args.format == "activitynet_qa" else 1):
            parser.error(f"--format={args.format}: wrong number of annotation files")
        if args.format == "activitynet_qa":
            rows = convert_activitynet_qa(files[0], files[1], args.video_dir, ext)
        elif args.format == "videomme":
            rows = convert_videomme(files[0], args.video_dir)
        else:
            convert = convert_msvd_qa if args.format == "msvd_qa" else convert_msrvtt_qa
            rows = convert(files[0], args.video_dir, ext)
        write_jsonl(args.out, rows)
        load_jsonl(args.out)  # the converted file must pass the same checks as any other
        missing = sum(not os.path.isfile(r["video"]) for r in rows)
        print(f"wrote {len(rows)} samples to {args.out}"
              + (f"; {missing} of their videos are not in {args.video_dir}" if missing else ""))
