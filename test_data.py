"""Tests for data.py (decoding, the JSONL format, converters) and synth.py (the synthetic task)."""

import json
import os
import subprocess
import sys
from collections import Counter, deque

import av
import numpy as np
import pytest
import torch

import benchmarks
import data
import synth
from data import DatasetError, VideoError

BACKENDS = ["pyav"] + (["decord"] if data.HAVE_DECORD else [])


def write_gray_video(path, num_frames=16, size=32):
    """Frame k is uniformly grey with brightness 16 * k."""
    frames = np.stack([np.full((size, size, 3), 16 * k, np.uint8) for k in range(num_frames)])
    synth.write_mp4(str(path), frames)
    return path


def brightness(video):
    return video.float().mean(dim=(1, 2, 3)).numpy()


# -----------------------------------------------------------------------------
# load_video

@pytest.mark.parametrize("backend", BACKENDS)
def test_load_video_samples_uniformly(tmp_path, backend):
    path = write_gray_video(tmp_path / "gray.mp4")
    video = data.load_video(path, 5, backend=backend)
    assert video.shape == (5, 32, 32, 3) and str(video.dtype) == "torch.uint8"
    expected = np.linspace(0, 15, 5).round() * 16  # frames 0, 4, 8, 11, 15
    assert np.abs(brightness(video) - expected).max() < 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_video_repeats_frames_of_a_short_video(tmp_path, backend):
    path = write_gray_video(tmp_path / "gray.mp4", num_frames=4)
    video = data.load_video(path, 7, backend=backend)
    assert video.shape[0] == 7
    assert np.abs(brightness(video) - np.linspace(0, 3, 7).round() * 16).max() < 4


def test_pyav_counts_frames_when_the_header_does_not(tmp_path):
    path = str(tmp_path / "gray.mkv")  # Matroska headers carry no frame count
    with av.open(path, "w", format="matroska") as container:
        stream = container.add_stream("libx264", rate=8)
        stream.width = stream.height = 32
        for k in range(16):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 16 * k, np.uint8), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with av.open(path) as container:
        assert container.streams.video[0].frames == 0
    video = data.load_video(path, 5, backend="pyav")
    assert np.abs(brightness(video) - np.linspace(0, 15, 5).round() * 16).max() < 4


def test_backends_agree(tmp_path):
    if not data.HAVE_DECORD:
        pytest.skip("decord not installed")
    path = write_gray_video(tmp_path / "gray.mp4")
    assert (data.load_video(path, 6, backend="decord") == data.load_video(path, 6, backend="pyav")).all()


def test_auto_backend_falls_back_to_pyav(tmp_path, monkeypatch):
    path = write_gray_video(tmp_path / "gray.mp4")
    monkeypatch.setattr(data, "HAVE_DECORD", False)
    assert np.abs(brightness(data.load_video(path, 2)) - [0, 240]).max() < 4
    with pytest.raises(ImportError):  # not a VideoError: a trainer must not skip every video
        data.load_video(path, 2, backend="decord")


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_video_missing_file(tmp_path, backend):
    path = tmp_path / "nope.mp4"
    with pytest.raises(VideoError, match="nope.mp4: file not found"):
        data.load_video(path, 4, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_video_corrupt_file(tmp_path, backend):
    path = tmp_path / "corrupt.mp4"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    with pytest.raises(VideoError) as info:
        data.load_video(path, 4, backend=backend)
    assert str(path) in str(info.value) and info.value.__cause__ is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_load_video_empty_and_frameless_files(tmp_path, backend):
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    with pytest.raises(VideoError, match="empty.mp4: file is empty"):
        data.load_video(empty, 4, backend=backend)
    frameless = tmp_path / "frameless.mp4"  # a valid container header, no frames
    container = av.open(str(frameless), "w")
    stream = container.add_stream("libx264", rate=8)
    stream.width = stream.height = 32
    container.start_encoding()
    container.close()
    with pytest.raises(VideoError, match="frameless.mp4: "):
        data.load_video(frameless, 4, backend=backend)


# -----------------------------------------------------------------------------
# load_jsonl / write_jsonl

def write_lines(path, lines):
    path.write_text("\n".join(json.dumps(x) if isinstance(x, dict) else x for x in lines) + "\n")
    return path


def sample(**kw):
    return dict({"id": "a", "video": "v/a.mp4", "question": "what ?", "answer": "red"}, **kw)


def test_load_jsonl_resolves_paths_and_keeps_fields(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [sample(id=7, extra=[1]), "", "   ",
                                              sample(id="b", video="/abs/b.mp4", category="colour")])
    rows = data.load_jsonl(path)
    assert [r["id"] for r in rows] == ["7", "b"]
    assert rows[0]["video"] == str(tmp_path / "v" / "a.mp4") and rows[0]["extra"] == [1]
    assert rows[1]["video"] == "/abs/b.mp4" and rows[1]["category"] == "colour"


def test_load_jsonl_reports_the_right_line(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [sample(id="1"), "", sample(id="2"), "{not json"])
    with pytest.raises(DatasetError, match=rf"^{tmp_path / 'd.jsonl'}:4: invalid JSON"):
        data.load_jsonl(path)


def test_load_jsonl_reports_every_error_in_order(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", [
        sample(id="1"),
        {"id": "2", "video": "x.mp4", "question": "q ?"},  # no answer
        sample(id="3", question=""),
        sample(id="1"),                                     # duplicate
        sample(id=True),
        "[1, 2]",
    ])
    with pytest.raises(DatasetError) as info:
        data.load_jsonl(path)
    lines = str(info.value).splitlines()
    assert [line.split(":")[1] for line in lines] == ["2", "3", "4", "5", "6"]
    assert "missing required field 'answer'" in lines[0]
    assert "'question' must be a non-empty string" in lines[1]
    assert "duplicate id '1' (first seen on line 1)" in lines[2]
    assert len(info.value.errors) == 5


def test_load_jsonl_caps_the_report(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", ["{"] * 25)
    with pytest.raises(DatasetError) as info:
        data.load_jsonl(path)
    lines = str(info.value).splitlines()
    assert len(lines) == data.MAX_REPORTED_ERRORS + 1 and lines[-1] == "... and 15 more errors"
    assert ":1: " in lines[0] and len(info.value.errors) == 25


def test_load_jsonl_multiple_choice(tmp_path):
    opts = ["red", "green", "blue"]
    good = write_lines(tmp_path / "good.jsonl", [sample(id="1", options=opts, answer="C"),
                                                 sample(id="2", options=opts, answer="green")])
    assert [r["answer"] for r in data.load_jsonl(good)] == ["C", "B"]  # option text -> letter
    bad = write_lines(tmp_path / "bad.jsonl", [
        sample(id="1", options=opts, answer="D"),
        sample(id="2", options=opts, answer="pink"),
        sample(id="3", options=["red"], answer="A"),
        sample(id="4", options=["red", "red"], answer="A"),
        sample(id="5", options=["red", 3], answer="A"),
    ])
    with pytest.raises(DatasetError) as info:
        data.load_jsonl(bad)
    lines = str(info.value).splitlines()
    assert len(lines) == 5
    assert "answer 'D' is out of range for 3 options" in lines[0]
    assert "neither a letter A-C nor one of the options" in lines[1]
    assert "list of 2 to 26 strings" in lines[2] and "duplicates" in lines[3]


def test_load_jsonl_empty_file(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(DatasetError, match="e.jsonl:1: the file has no samples"):
        data.load_jsonl(tmp_path / "e.jsonl")


def test_write_jsonl_round_trip(tmp_path):
    rows = [sample(id="1", question="¿qué?"), sample(id="2")]
    data.write_jsonl(tmp_path / "sub" / "d.jsonl", rows)
    loaded = data.load_jsonl(tmp_path / "sub" / "d.jsonl")
    assert loaded[0]["question"] == "¿qué?" and len(loaded) == 2
    assert os.listdir(tmp_path / "sub") == ["d.jsonl"]  # no temporary file left behind


# -----------------------------------------------------------------------------
# converters

def dump(path, obj, lines=False):
    path.write_text("\n".join(json.dumps(o) for o in obj) if lines else json.dumps(obj))
    return str(path)


def test_convert_msvd_qa(tmp_path):
    ann = dump(tmp_path / "test_qa.json", [
        {"video_name": "vid123", "question": "what is a man doing?", "answer": "dance", "question_id": "v_1"},
        {"video_id": 7, "question": "who sings?", "answer": "woman", "question_id": 2},
    ])
    rows = benchmarks.convert_msvd_qa(ann, "vids")
    assert rows[0] == {"id": "v_1", "video": os.path.abspath("vids/vid123.avi"),
                       "question": "what is a man doing?", "answer": "dance"}
    assert rows[1]["video"] == os.path.abspath("vids/vid7.avi") and rows[1]["id"] == "2"
    out = tmp_path / "msvd.jsonl"
    data.write_jsonl(out, rows)
    assert len(data.load_jsonl(out)) == 2


def test_convert_msrvtt_qa_and_missing_field(tmp_path):
    ann = dump(tmp_path / "qa.json", [
        {"video_name": "video7010", "question": "what is shown?", "answer": "car", "question_id": 0},
        {"video_id": 7011, "question": "what plays?", "answer": "guitar", "id": 1},
    ])
    rows = benchmarks.convert_msrvtt_qa(ann, str(tmp_path))
    assert [r["video"] for r in rows] == [str(tmp_path / "video7010.mp4"), str(tmp_path / "video7011.mp4")]
    assert [r["id"] for r in rows] == ["0", "1"]
    bad = dump(tmp_path / "bad.json", [{"video_name": "video1", "answer": "x", "question_id": 5}])
    with pytest.raises(DatasetError, match=r"bad.json: entry 0 \(question_id=5\): missing field 'question'"):
        benchmarks.convert_msrvtt_qa(bad, str(tmp_path))


def test_convert_activitynet_qa(tmp_path):
    q = dump(tmp_path / "test_q.json", [
        {"question": "what is the person doing", "video_name": "abc", "question_id": "abc_1"},
        {"question": "what color is the ball", "video_name": "def", "question_id": "def_0"},
    ])
    a = dump(tmp_path / "test_a.json", [
        {"answer": "red", "type": 4, "question_id": "def_0"},
        {"answer": "dancing", "type": 0, "question_id": "abc_1"},
    ])
    rows = benchmarks.convert_activitynet_qa(q, a, "anet")
    assert rows[0] == {"id": "abc_1", "video": os.path.abspath("anet/v_abc.mp4"),
                       "question": "what is the person doing", "answer": "dancing", "category": "motion"}
    assert rows[1]["category"] == "color" and rows[1]["answer"] == "red"
    lonely = dump(tmp_path / "a2.json", [{"answer": "red", "type": 4, "question_id": "def_0"}])
    with pytest.raises(DatasetError, match=r"test_q.json: entry 0 \(question_id='abc_1'\): no answer"):
        benchmarks.convert_activitynet_qa(q, lonely, "anet")


@pytest.mark.parametrize("lines", [False, True])
def test_convert_videomme(tmp_path, lines):
    row = {"video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "Humanity & History",
           "url": "https://www.youtube.com/watch?v=fFjv93ACGo8", "videoID": "fFjv93ACGo8",
           "question_id": "001-1", "task_type": "Counting Problem",
           "question": "How many people are shown?", "options": ["A. One.", "B. Two.", "C. Three.", "D. U.S."],
           "answer": "C"}
    ann = dump(tmp_path / "videomme.json", [row, dict(row, question_id="001-2", answer="A")], lines=lines)
    rows = benchmarks.convert_videomme(ann, "mme")
    assert rows[0]["options"] == ["One.", "Two.", "Three.", "U.S."]
    assert rows[0]["video"] == os.path.abspath("mme/fFjv93ACGo8.mp4")
    assert (rows[0]["category"], rows[0]["duration"], rows[0]["answer"]) == ("Counting Problem", "short", "C")
    out = tmp_path / "mme.jsonl"
    data.write_jsonl(out, rows)
    assert [r["answer"] for r in data.load_jsonl(out)] == ["C", "A"]
    bad = dump(tmp_path / "bad.json", [dict(row, answer="E")])
    with pytest.raises(DatasetError, match=r"bad.json: entry 0 \(question_id='001-1'\): answer 'E'"):
        benchmarks.convert_videomme(bad, "mme")


VIDEOMME_ROW = {"video_id": "001", "duration": "short", "domain": "Knowledge", "sub_category": "Humanity & History",
                "url": "https://www.youtube.com/watch?v=fFjv93ACGo8", "videoID": "fFjv93ACGo8", "question_id": "001-1",
                "task_type": "Counting Problem", "question": "How many people are shown?",
                "options": ["A. One.", "B. Two.", "C. Three.", "D. U.S."], "answer": "C"}


def test_convert_videomme_reads_the_published_parquet(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")            # optional: `pip install pyarrow`
    import pyarrow.parquet
    table = [VIDEOMME_ROW, dict(VIDEOMME_ROW, question_id="001-2", answer="A", task_type="OCR Problems")]
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(table), str(tmp_path / "test-00000-of-00001.parquet"))
    rows = benchmarks.convert_videomme(str(tmp_path / "test-00000-of-00001.parquet"), "mme")
    assert [r["id"] for r in rows] == ["001-1", "001-2"] and rows[1]["category"] == "OCR Problems"
    assert {k: rows[0][k] for k in ("domain", "sub_category", "video_id", "videoID", "task_type")} == {
        "domain": "Knowledge", "sub_category": "Humanity & History", "video_id": "001", "videoID": "fFjv93ACGo8",
        "task_type": "Counting Problem"}


def test_convert_videomme_says_how_to_read_parquet_without_pyarrow(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DatasetError, match=r"videomme.parquet: reading parquet needs pyarrow: pip install pyarrow"):
        benchmarks.convert_videomme(str(tmp_path / "videomme.parquet"), "mme")


def test_convert_videomme_release_layout_and_video_extensions(tmp_path):
    video = {k: VIDEOMME_ROW[k] for k in ("video_id", "duration", "domain", "sub_category")}
    questions = [{k: VIDEOMME_ROW[k] for k in ("question_id", "task_type", "question", "options", "answer")},
                 dict(question_id="001-2", task_type="OCR Problems", question="What is written?",
                      options=["A. x", "B. y", "C. z", "D. w"], answer="B")]
    second = dict(video, video_id="002", duration="long", questions=[dict(questions[0], question_id="002-1")])
    ann = dump(tmp_path / "videomme.json", [dict(video, questions=questions), second])
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "001.MP4").write_bytes(b"x")               # found as lmms-eval finds it: .mp4, .MP4, .mkv
    (tmp_path / "v" / "002.mkv").write_bytes(b"x")
    rows = benchmarks.convert_videomme(ann, str(tmp_path / "v"))
    assert [r["id"] for r in rows] == ["001-1", "001-2", "002-1"]
    assert [os.path.basename(r["video"]) for r in rows] == ["001.MP4", "001.MP4", "002.mkv"]
    assert (rows[1]["duration"], rows[1]["domain"], rows[2]["duration"]) == ("short", "Knowledge", "long")


@pytest.mark.parametrize("change, message", [
    ({"options": []}, "'options' must be a non-empty list"), ({"options": ["A. x", "", "C. z", "D. w"]}, "'options'"),
    ({"question": "  "}, "'question' must be a non-empty string"), ({"duration": "extra-long"}, "unknown duration"),
    ({"task_type": "Colour Problem"}, "unknown task_type 'Colour Problem'"), ({"answer": "E"}, "answer 'E'")])
def test_convert_videomme_validates_every_entry_and_writes_nothing_on_error(tmp_path, change, message):
    ann = dump(tmp_path / "bad.json", [VIDEOMME_ROW, dict(VIDEOMME_ROW, question_id="001-2", **change)])
    with pytest.raises(DatasetError, match=rf"bad.json: entry 1 \(question_id='001-2'\): {message}"):
        benchmarks.convert_videomme(ann, "mme")
    out = tmp_path / "out.jsonl"
    with pytest.raises(DatasetError):
        benchmarks.main(["--benchmark=videomme", f"--annotations={ann}", "--video_dir=mme", f"--out={out}"])
    assert not out.exists()


def test_convert_videomme_reports_duplicate_question_ids(tmp_path):
    ann = dump(tmp_path / "dup.json", [VIDEOMME_ROW, dict(VIDEOMME_ROW), dict(VIDEOMME_ROW, question_id="001-3")])
    with pytest.raises(DatasetError, match=r"entry 1 \(question_id='001-1'\): duplicate question_id \(first at entry 0\)"):
        benchmarks.convert_videomme(ann, "mme")


def test_convert_cli(tmp_path):
    ann = dump(tmp_path / "qa.json", [{"video_name": "vid1", "question": "q?", "answer": "a", "question_id": 1}])
    out = tmp_path / "out.jsonl"
    result = subprocess.run([sys.executable, "benchmarks.py", "--benchmark=msvd_qa", f"--annotations={ann}",
                             f"--video_dir={tmp_path}", f"--out={out}"],
                            cwd=os.path.dirname(os.path.abspath(data.__file__)), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "wrote 1 samples" in result.stdout and "1 video file(s) not found" in result.stdout
    assert str(tmp_path / "vid1.avi") in result.stdout                                  # named, not counted
    assert data.load_jsonl(out)[0]["video"] == str(tmp_path / "vid1.avi")


QA = {"video_name": "vid1", "question": "what is shown?", "answer": "a cat", "question_id": 1}


@pytest.mark.parametrize("kind, entries, message", [
    ("msvd_qa", [QA, dict(QA, video_name="vid2")], r"out.jsonl:2: duplicate id '1'"),
    ("msvd_qa", [QA, dict(QA, question_id=2, question="  ")], r"out.jsonl:2: 'question' must be a non-empty string"),
    ("msvd_qa", [QA, dict(QA, question_id=None)], r"entry 1 \(question_id=None\): the question id must be"),
    ("videomme", [VIDEOMME_ROW, dict(VIDEOMME_ROW, question_id="001-2", options=["A. x", "B. x", "C. y", "D. z"])],
     r"out.jsonl:2: 'options' contains duplicates")])
def test_benchmarks_validates_before_it_writes_and_keeps_a_previous_good_file(tmp_path, kind, entries, message):
    ann, out = dump(tmp_path / "ann.json", entries), tmp_path / "out.jsonl"
    out.write_text("a previous, good file\n")
    with pytest.raises(DatasetError, match=message):
        benchmarks.main([f"--benchmark={kind}", f"--annotations={ann}", f"--video_dir={tmp_path}", f"--out={out}"])
    assert out.read_text() == "a previous, good file\n" and sorted(os.listdir(tmp_path)) == ["ann.json", "out.jsonl"]


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "sub/../../outside"])
def test_a_video_name_that_leads_outside_video_dir_is_an_error_naming_the_entry(tmp_path, name):
    with pytest.raises(DatasetError, match=rf"qa.json: entry 1 \(question_id=2\): video name '{name}' leads outside"):
        benchmarks.convert_msvd_qa(dump(tmp_path / "qa.json", [QA, dict(QA, video_name=name, question_id=2)]), "vids")
    with pytest.raises(DatasetError, match=rf"entry 0 \(question_id='001-1'\): video name '{name}.mp4' leads outside"):
        benchmarks.convert_videomme(dump(tmp_path / "mme.json", [dict(VIDEOMME_ROW, videoID=name)]), "vids")


# -----------------------------------------------------------------------------
# synthetic video QA

@pytest.fixture(scope="module")
def synth_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    return out, synth.make_synthetic_dataset(out, num_train=16, num_eval=8, seed=3)


def colour_pixels(frame):
    """Counter of palette colour -> number of pixels, for the bright pixels of an RGB frame."""
    frame = np.asarray(frame).astype(np.int64)
    bright = frame.reshape(-1, 3)[frame.reshape(-1, 3).max(1) > 120]
    palette = np.array([synth.RGB[c] for c in synth.COLOURS])
    nearest = ((bright[:, None, :] - palette[None]) ** 2).sum(-1).argmin(1)
    return Counter(synth.COLOURS[i] for i in nearest)


def components(mask):
    """Number of 4-connected regions of a 2-D bool mask."""
    seen, count = np.zeros_like(mask), 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        count, queue = count + 1, deque([start])
        seen[start] = True
        while queue:
            y, x = queue.popleft()
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
    return count


def test_synthetic_dataset_files(synth_set):
    out, paths = synth_set
    train, evl, mc = (data.load_jsonl(paths[k]) for k in ("train", "eval", "eval_mc"))
    assert (len(train), len(evl), len(mc)) == (16, 8, 8)
    assert not {r["id"] for r in train} & {r["id"] for r in evl}
    assert Counter(r["category"] for r in train) == {c: 4 for c in synth.CATEGORIES}
    assert Counter(r["category"] for r in evl) == {c: 2 for c in synth.CATEGORIES}
    for row in train + evl:
        assert row["answer"] in synth.ANSWERS[row["category"]]
        assert data.load_video(row["video"], 8).shape == (8, 64, 64, 3)
    for open_row, mc_row in zip(evl, mc):
        assert {k: mc_row[k] for k in ("id", "video", "question", "category")} == \
               {k: open_row[k] for k in ("id", "video", "question", "category")}
        assert len(mc_row["options"]) == 4 == len(set(mc_row["options"]))
        assert mc_row["options"][data.LETTERS.index(mc_row["answer"])] == open_row["answer"]
        pool = synth.ANSWERS[mc_row["category"]] + synth.EXTRA_DISTRACTORS.get(mc_row["category"], [])
        assert set(mc_row["options"]) <= set(pool)
    vocab = set(synth.synthetic_vocab())
    for row in train + evl + mc:
        text = " ".join([row["question"], row["answer"]] + row.get("options", []))
        assert set(synth.split_words(text)) <= vocab, text
    assert synth.synthetic_vocab() == sorted(vocab)


def test_synthetic_dataset_is_deterministic_and_idempotent(synth_set, tmp_path):
    out, paths = synth_set
    mtimes = {p: os.stat(p).st_mtime_ns for p in paths.values()}
    assert synth.make_synthetic_dataset(out, num_train=16, num_eval=8, seed=3) == paths
    assert {p: os.stat(p).st_mtime_ns for p in paths.values()} == mtimes  # nothing rewritten
    again = synth.make_synthetic_dataset(tmp_path, num_train=16, num_eval=8, seed=3)
    for key in paths:
        assert open(paths[key]).read() == open(again[key]).read()
    for a, b in zip(data.load_jsonl(paths["train"]), data.load_jsonl(again["train"])):
        assert (data.load_video(a["video"], 8) == data.load_video(b["video"], 8)).all()
    other = synth.make_synthetic_dataset(tmp_path, num_train=16, num_eval=8, seed=4)  # new params: regenerate
    assert open(other["train"]).read() != open(paths["train"]).read()


def test_synthetic_categories_mean_what_they_say():
    rng = np.random.default_rng(0)
    for _ in range(6):
        for category in synth.CATEGORIES:
            for answer in synth.ANSWERS[category]:
                frames, question, got = synth.make_synthetic_video(rng, category, answer)
                assert frames.shape == (8, 64, 64, 3) and frames.dtype == np.uint8 and got == answer
                assert question in synth.QUESTIONS[category]
                mask = frames.max(-1) > 120
                if category == "colour":
                    assert set(colour_pixels(frames[0])) == {answer}
                elif category == "count":
                    assert components(mask[0]) == ["one", "two", "three"].index(answer) + 1
                elif category == "position":
                    ys, xs = np.nonzero(mask[0])
                    dy, dx = ys.mean() - 31.5, xs.mean() - 31.5
                    side = ("left" if dx < 0 else "right") if abs(dx) > abs(dy) else ("top" if dy < 0 else "bottom")
                    assert side == answer and max(abs(dx), abs(dy)) >= 12 and min(abs(dx), abs(dy)) <= 9


def test_synthetic_order_first_colour_visible_first(synth_set):
    _, paths = synth_set
    rows = [r for r in data.load_jsonl(paths["train"]) if r["category"] == "order"]
    assert rows
    for row in rows:
        video = data.load_video(row["video"], 8).numpy()  # decoded, after yuv420p compression
        first, last = colour_pixels(video[0]), colour_pixels(video[-1])
        assert set(c for c, n in first.items() if n > 20) == {row["answer"]}
        seen_last = set(c for c, n in last.items() if n > 20)
        assert len(seen_last) == 2 and row["answer"] in seen_last
        for t in range(4):  # nothing new in the first half
            assert set(c for c, n in colour_pixels(video[t]).items() if n > 20) == {row["answer"]}


def test_synthetic_clips_decode_to_the_same_pixels_every_time(tmp_path):
    # x264's lossy mode varied between runs (10 of 40 re-encodings of one clip differed in pixels),
    # which made results differ between machines; the generator writes lossless clips.
    rng = np.random.default_rng(5)
    frames, _, _ = synth.make_synthetic_video(rng, "colour")
    decoded = []
    for i in range(30):
        path = str(tmp_path / f"clip{i}.mp4")
        synth.write_mp4(path, frames)
        decoded.append(data.load_video(path, 8))
    assert all(torch.equal(d, decoded[0]) for d in decoded)
    assert (decoded[0].int() - torch.from_numpy(frames).int()).abs().max() <= 40   # only yuv420p chroma loss


# -----------------------------------------------------------------------------
# frames to the model's input size

def test_each_clip_is_fitted_as_it_is_decoded_so_a_huge_video_costs_nothing_extra(tmp_path):
    big, small = tmp_path / "big.mp4", tmp_path / "small.mp4"
    synth.write_mp4(str(big), np.random.default_rng(0).integers(0, 256, (4, 1200, 1600, 3), dtype=np.uint8))
    synth.write_mp4(str(small), np.random.default_rng(1).integers(0, 256, (4, 48, 64, 3), dtype=np.uint8))
    samples = [{"id": "big", "video": str(big)}, {"id": "small", "video": str(small)}]
    sizes = []

    def fit(clip):
        sizes.append(tuple(clip.shape))
        return data.fit_frames(clip, 32)
    frames, loaded, failures = data.read_videos(samples, 4, fit)
    assert sizes == [(4, 1200, 1600, 3), (4, 48, 64, 3)]                 # one clip at a time ...
    assert frames.shape == (2, 4, 32, 32, 3) and frames.dtype == torch.uint8   # ... batched at the model's size
    assert [s["id"] for s in loaded] == ["big", "small"] and not failures


def test_a_video_larger_than_1080p_is_decoded_scaled_down_so_its_size_costs_nothing(tmp_path, monkeypatch):
    assert data.MAX_DECODE_PIXELS == 1920 * 1080
    assert data.decode_size(4000, 3000) == (1662, 1246) and data.decode_size(1920, 1080) == (1920, 1080)
    assert data.decode_size(3840, 2160) == (1920, 1080)
    path = tmp_path / "wide.mp4"                        # the same at a size a test decodes quickly: cap 80 x 60
    synth.write_mp4(str(path), np.random.default_rng(0).integers(0, 256, (4, 120, 160, 3), dtype=np.uint8))
    monkeypatch.setattr(data, "MAX_DECODE_PIXELS", 80 * 60)
    clips = {backend: data.load_video(path, 4, backend=backend) for backend in BACKENDS}
    assert all(clip.shape == (4, 60, 80, 3) for clip in clips.values())       # aspect kept, never full size
    assert all((clip.float() - clips["pyav"].float()).abs().mean() < 4 for clip in clips.values())   # ffmpeg's, bilinear
                                                                                  # (measured 2.6 on this noise)
    monkeypatch.setattr(data, "MAX_DECODE_PIXELS", 160 * 120)                  # at the cap: pixel for pixel
    assert all(torch.equal(data.load_video(path, 4, backend=b), data.load_video(path, 4, backend="pyav"))
               for b in BACKENDS)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_path_that_is_no_video_file_says_what_it_is(tmp_path, backend):
    directory, fifo, loop, dangling = (tmp_path / name for name in ("dir.mp4", "fifo.mp4", "loop.mp4", "dangling.mp4"))
    directory.mkdir()
    os.mkfifo(fifo)                                      # never opened: a read would wait for a writer
    os.symlink(loop, loop)
    os.symlink(tmp_path / "gone.mp4", dangling)
    for path, what in ((directory, "a directory, not a video file"), (fifo, r"a FIFO \(named pipe\), not a video file"),
                       (loop, "a symlink loop, not a video file"), (dangling, "a symlink to a missing file")):
        with pytest.raises(VideoError, match=f"{path.name}: {what}"):
            data.load_video(path, 4, backend=backend)


def test_clip_cache_serves_decoded_clips_within_its_budget_and_never_failures(tmp_path, monkeypatch):
    paths = [write_gray_video(tmp_path / f"v{k}.mp4", num_frames=8) for k in range(3)]
    samples = {k: {"id": str(k), "video": str(path)} for k, path in enumerate(paths)}
    missing = {"id": "gone", "video": str(tmp_path / "missing.mp4")}
    clip_bytes = 4 * 32 * 32 * 3
    cache = data.ClipCache(max_bytes=2 * clip_bytes)                 # room for two clips
    decoded = Counter()
    real_load = data.load_video
    monkeypatch.setattr(data, "load_video", lambda path, n: decoded.update([os.path.basename(path)]) or real_load(path, n))
    for batch in ([0, 1], [1, 2], [0, 2]):                           # v1 is used, so v0 is the one that goes
        rows = [samples[k] for k in batch] + [missing]
        frames, loaded, failures = data.read_videos(rows, 4, cache=cache)
        assert torch.equal(frames, torch.stack([real_load(samples[k]["video"], 4) for k in batch]))
        assert [s["id"] for s in loaded] == [str(k) for k in batch]
        assert [s["id"] for s, _ in failures] == ["gone"]              # reported each time: failures are not kept
        assert cache.size <= 2 * clip_bytes
    assert decoded == Counter({"v0.mp4": 2, "v1.mp4": 1, "v2.mp4": 1, "missing.mp4": 3})


def test_each_loaded_sample_carries_its_clips_duration_for_time_positions(tmp_path):
    """read_videos puts each clip's duration (its container's header) in a copy of its sample, "seconds", which a
    policy with time positions takes (qwen_vl: M-RoPE); a row's own "seconds" wins; the cache keeps it."""
    from synth import write_mp4
    write_mp4(str(tmp_path / "a.mp4"), np.zeros((16, 32, 32, 3), dtype=np.uint8), fps=8)     # 2 s
    write_mp4(str(tmp_path / "b.mp4"), np.zeros((12, 32, 32, 3), dtype=np.uint8), fps=4)     # 3 s
    assert data.video_seconds(tmp_path / "a.mp4") == pytest.approx(2.0, abs=0.15)
    assert data.video_seconds(tmp_path / "missing.mp4") is None
    rows = [{"id": "a", "video": str(tmp_path / "a.mp4")}, {"id": "b", "video": str(tmp_path / "b.mp4")},
            {"id": "c", "video": str(tmp_path / "b.mp4"), "seconds": 60.0}]
    cache = data.ClipCache(max_bytes=1 << 20)
    for _ in range(2):                                                  # decoded, then from the cache
        _, loaded, _ = data.read_videos(rows, 4, cache=cache)
        assert [s["seconds"] for s in loaded] == [pytest.approx(2.0, abs=0.15), pytest.approx(3.0, abs=0.3), 60.0]
    assert "seconds" not in rows[0]                                      # the dataset's rows are left as they were


@pytest.mark.parametrize("height, width, pad", [(240, 320, False), (240, 320, True), (320, 240, True), (50, 50, False)])
def test_fit_frames_is_clip_image_processor(height, width, pad):
    from PIL import Image
    from transformers import CLIPImageProcessor
    processor = CLIPImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 36, "width": 36})
    frames = torch.from_numpy(np.random.default_rng(height + pad).integers(0, 256, (2, height, width, 3), dtype=np.uint8))
    images = [Image.fromarray(frame) for frame in frames.numpy()]
    if pad:   # VLM-RLAIF's expand2square, written from its description: centred on CLIP's mean colour
        side = max(width, height)
        squares = [Image.new("RGB", (side, side), (122, 116, 104)) for _ in images]
        for square, image in zip(squares, images):
            square.paste(image, ((side - width) // 2, (side - height) // 2))
        images = squares
    expected = torch.as_tensor(np.array(processor(images=images, return_tensors="np")["pixel_values"]))
    got = data.clip_pixels(data.fit_frames(frames, 36, pad))
    assert got.shape == expected.shape == (2, 3, 36, 36)
    assert torch.allclose(got, expected, atol=1e-6)
