"""Errors a user meets name the file or config key and what to do, without a traceback in front:
a NaN or infinite number in the config, a video that cannot be read, a full disk (and the damaged
copies that may have filled it), a named error escaping a job, outputs dated ahead of the clock."""

import errno
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import polars as pl
import pytest

import iisan.io as io_mod
from iisan import errors
from iisan.io import DiskFullError, atomic_path, require_free_space, set_aside, write_json, write_parquet
from iisan.pipeline import workflow

ROOT = Path(__file__).resolve().parents[1]
TINY = "tests/configs/tiny.yaml"


# --- 1. NaN and infinite numbers -----------------------------------------------------------------

@pytest.mark.parametrize(("overrides", "message"), [
    ({"train": {"lr_main": "nan"}}, "config key train.lr_main: nan reads as NaN (not a number); give a finite number"),
    ({"train": {"lr_main": ".nan"}}, "config key train.lr_main: nan reads as NaN"),
    ({"model": {"gate_temperature": ".inf"}}, "config key model.gate_temperature: inf reads as infinity"),
    ({"method_train": {"IISAN-VS": {"lr_san": "-.inf"}}}, "config key method_train.IISAN-VS.lr_san: -inf is less than"),
    ({"captions": {"frames": [0.5, "nan"]}}, "config key captions.frames[1]: nan reads as NaN"),
    ({"dataset_sources": {"demo": {"demo": {"p_stay": ".nan"}}}}, "config key dataset_sources.demo.demo.p_stay: nan reads as NaN"),
])
def test_a_nan_or_infinite_number_is_refused_naming_its_key(overrides, message):
    """The schema's bounds let NaN through (every comparison with it is false): the check after
    it names the key, wherever it is; an infinity beyond a bound is the schema's to name."""
    with pytest.raises(ValueError) as err:
        workflow.workflow_config(ROOT, [TINY], overrides)
    assert message in str(err.value), str(err.value)


def test_a_nan_in_a_config_file_is_refused_naming_its_key(tmp_path):
    f = tmp_path / "nan.yaml"
    f.write_text("train:\n  lr_main: .nan\ncluster:\n  gpu_gib: .inf\n")
    with pytest.raises(ValueError, match=r"^config key train\.lr_main: nan reads as NaN \(not a number\); give a finite number$"):
        workflow.workflow_config(ROOT, [TINY, str(f)])
    f.write_text("cluster:\n  gpu_gib: .inf\n")
    with pytest.raises(ValueError, match=r"^config key cluster\.gpu_gib: inf reads as infinity; give a finite number$"):
        workflow.workflow_config(ROOT, [TINY, str(f)])
    workflow.check_finite({"a": [1, 2.5, {"b": -1e308}], "c": True, "d": None, "e": "nan"})  # finite, or not numbers


# --- 2. a video that cannot be read ----------------------------------------------------------------

def test_a_missing_video_names_the_config_key_that_skips_it(tmp_path):
    from iisan.data.frames import VideoError, extract_all

    with pytest.raises(VideoError) as err:
        extract_all(["42"], tmp_path, tmp_path / "frames.zip")
    text = str(err.value)
    assert text.startswith(f"item '42': {tmp_path / '42.mp4'}: no such video file; ") and "captions.missing_videos: skip" in text
    allowed = workflow.schema(ROOT)["properties"]["captions"]["properties"]["missing_videos"]["enum"]
    assert "skip" in allowed  # the hint names a key and value the config takes


# --- 3. a full disk names the file -----------------------------------------------------------------

def _full_disk_parquet(monkeypatch):
    """polars' own error for a full disk: its Parquet writer pointed at /dev/full."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    real = pl.DataFrame.write_parquet
    monkeypatch.setattr(pl.DataFrame, "write_parquet", lambda self, f, **kw: real(self, "/dev/full", **kw))


def test_a_parquet_write_on_a_full_disk_names_the_file(tmp_path, monkeypatch):
    _full_disk_parquet(monkeypatch)
    out = tmp_path / "data" / "items.parquet"
    out.parent.mkdir()
    out.write_bytes(b"old")
    with pytest.raises(DiskFullError) as err:
        write_parquet(pl.DataFrame({"a": list(range(100_000))}), out)
    text = str(err.value)
    assert text.startswith(f"{out}: cannot write it: the disk is full (ComputeError: ") and "os error 28" in text, text
    assert text.endswith("free now; free some space and rerun") and err.value.errno == errno.ENOSPC
    assert errors.is_named(err.value) and isinstance(err.value, OSError)
    assert [p.name for p in out.parent.iterdir()] == ["items.parquet"] and out.read_bytes() == b"old"  # no temporary left


def test_the_dataset_parquet_writers_name_the_file_on_a_full_disk(tmp_path, monkeypatch):
    """Preprocessing and the captions write their Parquet files through iisan.io.write_parquet."""
    import inspect

    from iisan.captions import files as captions
    from iisan.data import amazon

    for module in (amazon, captions):
        assert "write_parquet(" in inspect.getsource(module) and module.write_parquet is write_parquet
    _full_disk_parquet(monkeypatch)
    with pytest.raises(DiskFullError, match=rf"^{tmp_path}/sequences.parquet: cannot write it: the disk is full"):
        amazon.write_parquet(pl.DataFrame({"user": [1]}), tmp_path / "sequences.parquet")


@pytest.mark.parametrize("raised", [OSError(errno.ENOSPC, "No space left on device"),
                                    OSError("No space left on device (os error 28)"),
                                    RuntimeError("write failed"),
                                    OSError(errno.EDQUOT, "Disk quota exceeded")])
def test_any_atomic_write_that_runs_out_of_space_names_the_file(tmp_path, monkeypatch, raised):
    """Python's OSError, a Rust library's text, a quota; an unnamed error (torch.save's) counts
    when the filesystem is all but full at that moment."""
    if isinstance(raised, RuntimeError):
        real = io_mod.shutil.disk_usage
        monkeypatch.setattr(io_mod.shutil, "disk_usage", lambda p: real(p)._replace(free=4096))
    with pytest.raises(DiskFullError) as err:
        with atomic_path(tmp_path / "checkpoint.pt") as tmp:
            tmp.write_bytes(b"x")
            raise raised
    words = "the disk quota is exceeded" if getattr(raised, "errno", None) == errno.EDQUOT else "the disk is full"
    assert str(err.value).startswith(f"{tmp_path / 'checkpoint.pt'}: cannot write it: {words} ({type(raised).__name__}: ")
    assert err.value.__cause__ is raised and not list(tmp_path.iterdir())


def test_other_write_errors_stay_as_they_are(tmp_path):
    with pytest.raises(ValueError, match="^not a disk problem$"):
        with atomic_path(tmp_path / "m.json") as tmp:
            tmp.write_text("{")
            raise ValueError("not a disk problem")
    write_json(tmp_path / "m.json", {"a": 1})
    assert (tmp_path / "m.json").is_file()


# --- 4. the damaged copies beside a file that does not fit ----------------------------------------

def test_disk_full_lists_the_damaged_copies_beside_the_file(tmp_path, monkeypatch):
    real = io_mod.shutil.disk_usage
    monkeypatch.setattr(io_mod.shutil, "disk_usage", lambda p: real(p)._replace(free=2**20))
    array = tmp_path / "array.npy"
    for size in (3 * 2**20, 5000):
        array.write_bytes(b"x" * size)
        set_aside(array, "test")
    folder = tmp_path / "bert"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"x" * 2048)
    set_aside(folder, "test")
    (tmp_path / "other.npy.damaged-20240101T000000Z").write_bytes(b"x")  # another file's
    copies = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("array.npy.damaged-"))
    assert len(copies) == 2

    with pytest.raises(DiskFullError) as err:
        require_free_space(array, 2**30)
    text = str(err.value)
    assert text.startswith(f"{array}: needs {2**30} bytes (1.00 GiB), but its filesystem has only {2**20} bytes")
    sizes = {copies[0]: "3.0 MiB", copies[1]: "4.9 KiB"}
    assert "Beside it, 2 damaged copies of it moved aside earlier take 3.0 MiB and may be what filled the disk: " in text
    assert ", ".join(f"{n} ({sizes[n]})" for n in copies) in text and "other.npy" not in text
    assert text.endswith("Delete those you no longer need, or free other space, and rerun")
    # a file being written as <name>.partial: the copies of <name>
    assert ", ".join(f"{n} ({sizes[n]})" for n in copies) in str(pytest.raises(
        DiskFullError, require_free_space, tmp_path / "array.npy.partial", 2**30).value)
    # a folder's copy: the files in it
    with pytest.raises(DiskFullError, match=r"a damaged copy of it moved aside earlier takes 2.0 KiB .*: bert\.damaged-\S+ \(2\.0 KiB\)\. "
                                            r"Delete it if you no longer need it"):
        with atomic_path(folder):
            raise OSError(errno.ENOSPC, "No space left on device")
    # none: nothing said about them
    with pytest.raises(DiskFullError) as err:
        require_free_space(tmp_path / "new.npy", 2**30)
    assert "damaged" not in str(err.value) and str(err.value).endswith("; free some space and rerun")


# --- 5. a named error escaping a job ----------------------------------------------------------------

JOB = """
import sys
from pathlib import Path
from types import SimpleNamespace
from iisan.pipeline.jobs import job

with job(SimpleNamespace(log=[sys.argv[1]], threads=0)):
    print("reading the runs")
    if sys.argv[2] == "named":
        from iisan.tables.build import read_runs
        read_runs([{}], [Path(sys.argv[3])])
    else:
        {}["unexpected"]
"""


def test_a_named_error_escaping_a_job_is_its_message_alone(tmp_path):
    """A truncated metrics.json: DamagedFileError's message (the file, where it went, what to do)
    is the log's last line, with no traceback; the job still fails. An unexpected error keeps its
    traceback."""
    metrics = tmp_path / "run" / "metrics.json"
    write_json(metrics, {"hr@10": 0.5})
    metrics.write_text(metrics.read_text()[:-4])
    log = tmp_path / "named.log"
    res = subprocess.run([sys.executable, "-c", JOB, str(log), "named", str(metrics)], capture_output=True, text=True)
    text = log.read_text()
    assert res.returncode == 1 and res.stdout == res.stderr == "", res.stderr
    assert "Traceback" not in text and text.startswith("reading the runs\n"), text
    last = text.rstrip("\n").splitlines()[-1]
    assert last.startswith(f"error: {metrics}: unreadable (JSONDecodeError: ") and "moved aside to" in last, text
    assert "rerun the workflow: it redoes the job" in last

    log = tmp_path / "unexpected.log"
    res = subprocess.run([sys.executable, "-c", JOB, str(log), "unexpected"], capture_output=True, text=True)
    text = log.read_text()
    assert res.returncode == 1 and "Traceback (most recent call last)" in text and "KeyError: 'unexpected'" in text, text


def test_the_named_errors_exist_and_are_told_apart():
    import importlib

    for name in errors.NAMED:
        module, cls = name.rsplit(".", 1)
        assert issubclass(getattr(importlib.import_module(module), cls), Exception), name
    from iisan.data.frames import VideoError
    from iisan.encoders.cache_files import CacheMismatch
    from iisan.encoders.models_fetch import ModelFetchError
    from iisan.io import DamagedFileError
    from iisan.pipeline.gpus import LockUnsupported

    for err in (CacheMismatch("x"), VideoError("x"), LockUnsupported(errno.ENOLCK, "x"), DamagedFileError("x"),
                DiskFullError("x"), ModelFetchError("x")):
        assert errors.is_named(err), err
    for err in (ValueError("x"), OSError(errno.ENOSPC, "x"), KeyError("x"), RuntimeError("x")):
        assert not errors.is_named(err), err
    err = ValueError("first line")
    err.add_note("a note")
    assert errors.message(err) == "first line\na note"


@pytest.mark.slow  # one Snakemake run of one local job: a few seconds
def test_snakemake_shows_a_failed_jobs_named_error_without_a_traceback(tmp_path):
    (tmp_path / "Snakefile").write_text(textwrap.dedent("""
        rule bad:
            output: "out.txt"
            log: "logs/bad.log"
            script: "bad.py"
    """))
    (tmp_path / "bad.py").write_text(textwrap.dedent("""
        from iisan.io import DiskFullError
        from iisan.pipeline.jobs import job

        with job(snakemake):
            raise DiskFullError("results/x.parquet: cannot write it: the disk is full; free some space and rerun")
    """))
    res = subprocess.run([sys.executable, "-m", "snakemake", "--cores", "1", "--show-failed-logs", "--nolock"],
                         cwd=tmp_path, capture_output=True, text=True)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "error: results/x.parquet: cannot write it: the disk is full" in out, out[-3000:]
    assert "Traceback" not in (tmp_path / "logs" / "bad.log").read_text()
    assert "Traceback" not in out, out[-3000:]


# --- 6. outputs dated ahead of the clock ------------------------------------------------------------

def test_files_dated_ahead_of_the_clock_are_named_with_what_to_do(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    now = time.time()
    files = {"results/table3.csv": 3 * 3600, "resources/data/demo/items.parquet": 20 * 60,
             "results/runs/a/metrics.json": 0, "resources/hf-cache/x": 120, "elsewhere/late.txt": 3600}
    for name, ahead in files.items():
        p = tmp_path / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
        os.utime(p, (now + ahead, now + ahead))
    (tmp_path / "resources" / "link").symlink_to(tmp_path / "results" / "table3.csv")  # judged by its own time
    (tmp_path / "elsewhere" / "scratch").mkdir()
    (tmp_path / "elsewhere" / "scratch" / "array.npy").write_text("x")
    os.utime(tmp_path / "elsewhere" / "scratch" / "array.npy", (now + 600, now + 600))
    (tmp_path / "resources" / "cache").symlink_to(tmp_path / "elsewhere" / "scratch")  # a link below: not followed

    ahead, complete = workflow.future_files(now=now)
    assert complete and [(str(p), round(s)) for p, s in ahead] == [("results/table3.csv", 3 * 3600),
                                                                    ("resources/data/demo/items.parquet", 20 * 60)]
    text = workflow.future_files_warning(ahead)
    assert text.startswith("warning: 2 files under results/ or resources/ are dated ahead of this machine's clock:\n"
                           "  results/table3.csv (3.0 h ahead)\n  resources/data/demo/items.parquet (20 min ahead)\n")
    for words in ("Snakemake", "retrained", "touch -d now", "clock"):
        assert words in text

    import io

    out = io.StringIO()
    assert [str(p) for p, _ in workflow.warn_future_files(file=out)] == ["results/table3.csv", "resources/data/demo/items.parquet"]
    assert out.getvalue() == text + "\n"
    # the advice works: given this machine's time, nothing is reported
    os.utime("results/table3.csv")
    os.utime("resources/data/demo/items.parquet")
    assert workflow.future_files() == ([], True) and workflow.future_files_warning([]) is None
    assert workflow.warn_future_files(file=out) == [] and out.getvalue() == text + "\n"
    # a scan out of time says so
    os.utime("results/table3.csv", (now + 3600, now + 3600))
    assert workflow.future_files(budget_s=0)[1] is False
    assert "there may be more" in workflow.future_files_warning([(Path("results"), 3600.0)], complete=False)


def test_no_results_folder_is_nothing_to_report_and_a_linked_one_is_scanned(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert workflow.future_files() == ([], True)
    scratch = tmp_path / "scratch"
    (scratch / "runs").mkdir(parents=True)
    (scratch / "runs" / "metrics.json").write_text("{}")
    os.utime(scratch / "runs" / "metrics.json", (time.time() + 3600, time.time() + 3600))
    (tmp_path / "results").symlink_to(scratch)  # results/ on a scratch filesystem
    assert [str(p) for p, _ in workflow.future_files()[0]] == ["results/runs/metrics.json"]
