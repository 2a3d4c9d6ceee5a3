"""
What a training run writes in its out_dir, so that train.py's loop reads as Algorithm 1:

    metrics.jsonl   one JSON line per RL step (train_step's metrics, the lr, the fault counters, samples/s)
    evals.jsonl     one line per held-out evaluation during the run (--eval_every)
    results.json    before / after accuracy, the configuration, seconds per phase, the fault counters
    tensorboard/    the same numbers with --report_to=tensorboard, for watching a run live

Only process 0 writes; on the other processes a RunLog does nothing. `lock_out_dir` keeps a second
train.py off an out_dir in use (out_dir/train.lock, held while the run lives). metrics.jsonl is the record
(`python experiments.py --study=plot --plot_dir=OUT` draws it); TensorBoard is a view of it. The study
(experiments.py) keeps a finished run's metrics.jsonl as metrics.jsonl.gz (`archive_metrics`), which
`read_jsonl` reads as well.
"""
import contextlib
import fcntl
import gzip
import json
import os
import warnings

from tables import format_comparison

ARCHIVE_DIGITS = 6           # significant digits of a float kept by archive_metrics


def lock_out_dir(out_dir):
    """Hold out_dir/train.lock (an exclusive flock, which the kernel drops when the process ends, kill -9
    included) -> the open file: keep it, closing it releases the lock. A second run on the same out_dir
    would interleave its metrics with the first's and overwrite its checkpoints (measured: one died
    mid-save, or both exited 0), so it stops at once, naming the holder's pid. Creates out_dir; one that
    cannot be written is an error naming it."""
    path = os.path.join(out_dir, "train.lock")
    try:
        os.makedirs(out_dir, exist_ok=True)
        lock = open(path, "a+", encoding="utf-8")
    except OSError as err:
        raise SystemExit(f"--out_dir={out_dir} is not writable: {err}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.seek(0)
        holder = lock.read().strip() or "unknown"
        lock.close()
        raise SystemExit(f"--out_dir={out_dir} is in use by another run (pid {holder}, lock {path}): wait for it, stop "
                         "it, or use another --out_dir") from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def keep_metrics_until(path, step):
    """Drop the lines of steps after the checkpoint we resume from (a crashed run's tail), and any
    half-written or undecodable line (with a warning naming it)."""
    kept = []
    if step > 0 and os.path.exists(path):
        with open(path, "rb") as f:        # bytes: a line that is not UTF-8 is one more bad line
            for number, line in enumerate(f, start=1):
                try:
                    text = line.decode("utf-8")
                    if text.strip() and json.loads(text)["step"] <= step:
                        kept.append(text if text.endswith("\n") else text + "\n")
                except (ValueError, KeyError, TypeError, RecursionError):
                    warnings.warn(f"{path}:{number}: unreadable metrics line dropped (a run killed mid-write?)")
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(kept)


def write_atomically(path, text):
    """text to path, never seen half-written: written beside it, flushed to the disk, then renamed in. A
    failure (a full disk) removes the temporary file, leaves an earlier `path` as it was, and raises
    OSError naming path: no empty or partial file is left for a reader to take as complete."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise OSError(err.errno, f"{path} not written ({err.strerror or err}); an earlier one is left as it was") from None


def append_jsonl(path, row):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_jsonl(path):
    """The rows of a JSONL file, or of its archived copy PATH.gz; [] if neither exists."""
    if not os.path.exists(path) and os.path.exists(path + ".gz"):
        path += ".gz"
    if not os.path.exists(path):
        return []
    with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def archive_metrics(path, digits=ARCHIVE_DIGITS):
    """A finished run's metrics.jsonl -> metrics.jsonl.gz, the plain file removed: the same lines and keys, every
    float of more than 10 characters to `digits` significant digits (a 1600-step run: 0.9 MB -> 84 KB). The
    counts and fractions stay exact (sample accuracy, truncated fraction, Oracle rank); the report's tables
    read the same to their last printed digit (a test checks it); the full-precision files of the 217-run
    study are in the git history. Written beside its place and renamed in; gzip's header carries no time, so
    the same metrics give the same bytes. -> the .gz path"""
    rounded = lambda value: (float(f"{value:.{digits}g}") if isinstance(value, float) and len(repr(value)) > 10
                             else value)     # short ones stay exact: fractions such as 63/128 = 0.4921875
    lines = [json.dumps({key: rounded(value) for key, value in row.items()}, separators=(",", ":"))
             for row in read_jsonl(path)]
    with open(path + ".gz.tmp", "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as f:
        f.write(("\n".join(lines) + "\n").encode("utf-8"))
    os.replace(path + ".gz.tmp", path + ".gz")
    os.remove(path)
    return path + ".gz"


def tensorboard_writer(out_dir):
    """A TensorBoard SummaryWriter into out_dir/tensorboard; a clear message if the package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise SystemExit("--report_to=tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(os.path.join(out_dir, "tensorboard"))


class RunLog:
    """The run's records in out_dir (process 0 only). Opened before any work, so a missing TensorBoard
    is reported before the warm start trains; `start(step)` trims metrics.jsonl to the step resumed from."""

    def __init__(self, out_dir, master, report_to="none"):
        self.out_dir, self.master = out_dir, master
        self.writer = tensorboard_writer(out_dir) if master and report_to == "tensorboard" else None

    def path(self, name):
        return os.path.join(self.out_dir, name)

    def start(self, step):
        if self.master:
            keep_metrics_until(self.path("metrics.jsonl"), step)

    def step(self, row):
        """One step's metrics row (it holds "step")."""
        if self.master:
            append_jsonl(self.path("metrics.jsonl"), row)
            self.scalars("train", row, row["step"])

    def evaluation(self, results, step, record=True):
        """A held-out evaluation: to evals.jsonl (record=True; before and after go to results.json) and TensorBoard."""
        if self.master and record:
            append_jsonl(self.path("evals.jsonl"), {"step": step, **results})
        self.scalars("eval", results, step)

    def results(self, results):
        """results.json, written atomically (write_atomically): experiments.py takes its presence for a
        finished run, so it is never seen empty or half-written, a full disk included."""
        if self.master:
            write_atomically(self.path("results.json"), json.dumps(results, indent=2))

    def finish(self, before, after, config, seconds, counters, names):
        """results.json at the end of a run, and the before/after table (names: its two columns). -> the results"""
        results = {"before": before, "after": after, "config": config, "seconds": seconds, "counters": counters}
        self.results(results)
        if self.master:
            if before and after:
                print(format_comparison(before, after, names=names))
            print(f"wrote {self.path('results.json')}; {counters}; {seconds['total']:.0f} s in all")
        return results

    def scalars(self, prefix, values, step):
        """Numbers of a metrics row or an evaluation (its by_* breakdowns as prefix/by_category/NAME) to TensorBoard."""
        if self.writer is None:
            return
        for key, value in (values or {}).items():
            if isinstance(value, dict):
                for name, metrics in value.items():
                    self.writer.add_scalar(f"{prefix}/{key}/{name}", metrics["accuracy"], step)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{prefix}/{key}", value, step)
        self.writer.flush()

    def close(self):
        if self.writer is not None:
            self.writer.close()
