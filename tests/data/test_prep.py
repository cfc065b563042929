"""`tinytrain prepare --config`: real files of every supported kind, real worker processes, real kills."""

import gzip
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import processes, run_tinytrain, small_tmpfs, tree_digest

from tinytrain.data import shards
from tinytrain.data.prep import is_validation
from tinytrain.data.tokenizer import Tokenizer, train_tokenizer

WORDS = ("the model reads token shards and the loss falls while python code returns a value "
         "def class import for in if else epoch step train data").split()


def _text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 120))) + "\n"


def write_mixed_corpus(root: Path, seed: int = 0, files: int = 6, per_file: int = 40) -> dict:
    """A web-like jsonl source (plain, .zst, .gz) with bad records, and a code-like parquet + txt source.

    Returns, per source, the documents that must survive, in order: (relative file, line or row, text)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    rng = random.Random(seed)
    web, code = root / "web", root / "code"
    (web / "sub").mkdir(parents=True)
    code.mkdir(parents=True)
    kept = {"web": [], "code": []}
    for i in range(files):
        rel = f"sub/part-{i:02d}.jsonl" if i % 3 == 0 else f"part-{i:02d}.jsonl" + ("", ".zst", ".gz")[i % 3]
        lines = []
        for line in range(1, per_file + 1):
            subset = rng.choice(["RedPajamaCommonCrawl", "RedPajamaBook", "RedPajamaGithub"])
            text = _text(rng)
            lines.append(json.dumps({"text": text, "meta": {"redpajama_set_name": subset}}).encode())
            if subset != "RedPajamaGithub":
                kept["web"].append((rel, line, text))
        if i == 1:  # one of each kind of bad record, after the good ones
            lines += [b'{"text": "unterminated', b'{"text": "caf\xe9 latin-1"}', b'{"text": "   "}',
                      b'{"content": "wrong field"}', b'["not", "an", "object"]']
        data = b"\n".join(lines) + b"\n"
        if rel.endswith(".zst"):  # two frames, as concatenated .zst files have
            half = data.index(b"\n", len(data) // 2) + 1
            data = zstandard.ZstdCompressor().compress(data[:half]) + zstandard.ZstdCompressor().compress(data[half:])
        elif rel.endswith(".gz"):
            data = gzip.compress(data, mtime=0)
        (web / rel).write_bytes(data)
    (web / "part-99.jsonl.zst").write_bytes(b"this is not zstd data")  # unreadable: reported, skipped
    for i in range(3):
        texts = [_text(rng) for _ in range(per_file)]
        pq.write_table(pa.table({"content": texts, "lang": ["python"] * per_file}), code / f"code-{i}.parquet",
                       row_group_size=16)
        kept["code"] += [(f"code-{i}.parquet", row, t) for row, t in enumerate(texts, 1)]
    readme = _text(rng)
    (code / "zz-readme.txt").write_text(readme)
    kept["code"].append(("zz-readme.txt", 1, readme))
    return kept


SPEC = """\
out: {out}
tokenizer: {tokenizer}
val_fraction: 0.05
unit_bytes: 8000
shard_tokens: 3000
sources:
  - name: web
    path: {root}/web
    filters:
      - field: meta.redpajama_set_name
        drop: [RedPajamaGithub]
  - name: code
    path: {root}/code
    text_field: content
"""


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixed")
    kept = write_mixed_corpus(root / "corpus")
    rng = random.Random(1)
    tok = train_tokenizer((_text(rng) for _ in range(4000)), root / "tok.model", 512)
    return root, kept, tok


def write_spec(corpus, out: Path, name: str = "spec.yaml", extra: str = "") -> Path:
    root, _, tok = corpus
    path = out.parent / name
    path.write_text(SPEC.format(out=out, tokenizer=tok.path, root=root / "corpus") + extra)
    return path


@pytest.fixture(scope="module")
def prepared_mix(corpus, tmp_path_factory):
    """The mixed corpus prepared with one process: the reference output."""
    out = tmp_path_factory.mktemp("prep1") / "out"
    run_tinytrain("prepare", "--config", write_spec(corpus, out), cwd=out.parent)
    return out


def _split_tokens(folder: Path, split: str) -> np.ndarray:
    return np.concatenate([np.asarray(shards.open_shard(folder / e["file"]))
                           for e in shards.read_manifest(folder)["splits"][split]])


@pytest.mark.parametrize("name", ["web", "code"])
def test_shards_are_the_kept_documents_concatenated_with_bos(corpus, prepared_mix, name):
    _, kept, tok = corpus
    folder = prepared_mix / name
    expected = {"train": [], "val": []}
    for rel, index, text in sorted(kept[name], key=lambda k: k[0]):  # files in path order, lines in file order
        expected["val" if is_validation(f"{rel}\0{index}", 0.05) else "train"] += tok.encode(text, bos=True)
    for split in ("train", "val"):
        np.testing.assert_array_equal(_split_tokens(folder, split), expected[split])
    manifest = shards.read_manifest(folder)
    assert manifest["documents"]["train"] + manifest["documents"]["val"] == len(kept[name])
    assert manifest["documents"]["val"] > 0
    assert manifest["tokens"]["train"] == len(expected["train"])
    assert manifest["settings"]["bos"] is True and manifest["settings"]["eos"] is False
    assert manifest["tokenizer"]["sha256"] == tok.sha256
    assert Tokenizer(folder / "tokenizer.model").sha256 == tok.sha256
    assert all(e["tokens"] <= 3000 for e in manifest["splits"]["train"])
    assert not (folder / ".prep").exists()


def test_bad_records_are_counted_per_file(prepared_mix):
    report = shards.read_manifest(prepared_mix / "web")["report"]
    assert report["files"] == 7
    assert (report["malformed_json"], report["non_utf8"], report["empty"], report["missing_field"]) == (2, 1, 1, 1)
    problems = {p["file"]: p for p in report["files_with_problems"]}
    assert set(problems) == {"part-01.jsonl.zst", "part-99.jsonl.zst"}
    assert problems["part-01.jsonl.zst"]["malformed_json"] == 2
    assert "ZstdError" in problems["part-99.jsonl.zst"]["error"]
    assert report["filtered"] > 0  # the RedPajamaGithub records


def test_strict_spec_stops_at_the_first_bad_record(corpus, tmp_path):
    out = tmp_path / "out"
    proc = run_tinytrain("prepare", "--config", write_spec(corpus, out), "--strict", "true", cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert "part-01.jsonl.zst:41: malformed json (the spec says strict: true)" in proc.stderr
    assert not (out / "web" / "manifest.json").exists()


def test_output_is_identical_for_any_number_of_workers(corpus, prepared_mix, tmp_path):
    out = tmp_path / "out"
    proc = run_tinytrain("prepare", "--config", write_spec(corpus, out), "--workers", "3", cwd=tmp_path,
                         env={"TINYTRAIN_PROGRESS": "1"})
    assert tree_digest(out) == tree_digest(prepared_mix)
    manifest = shards.read_manifest(out / "web")
    docs = manifest["documents"]["train"] + manifest["documents"]["val"]
    total = sum(manifest["tokens"].values())
    assert f"{docs:,} docs, {total:,} tokens" in proc.stderr and "tok/s" in proc.stderr  # the progress bar


def test_verify_passes_then_names_an_altered_file(prepared_mix, tmp_path):
    import shutil

    proc = run_tinytrain("prepare", "--verify", prepared_mix, cwd=tmp_path)
    assert proc.stdout.count(": ok (") == 2
    copy = tmp_path / "copy"
    shutil.copytree(prepared_mix / "code", copy)
    victim = copy / shards.read_manifest(copy)["splits"]["train"][1]["file"]
    data = bytearray(victim.read_bytes())
    data[40] ^= 1  # same size, same header: only the checksum can tell
    victim.write_bytes(bytes(data))
    proc = run_tinytrain("prepare", "--verify", copy, cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert f"{victim}: sha256" in proc.stderr and "the file was altered" in proc.stderr


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"finished before {path} appeared:\n{proc.stderr.read()}"
        assert time.monotonic() < deadline
        time.sleep(0.005)


def _prepare_killed_after(spec: Path, unit: Path, cwd: Path, env: dict) -> None:
    """`tinytrain prepare --config spec`, killed with SIGKILL once ``unit`` is written."""
    proc = subprocess.Popen([sys.executable, "-m", "tinytrain", "prepare", "--config", str(spec)], cwd=cwd,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(unit, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def big_preparation(corpus, tmp_path: Path) -> tuple[Path, Path, Path]:
    """A corpus of 40 units (so a kill lands well before the end), prepared once by one process as
    the reference: (the spec to prepare it again, its out folder, the reference folder)."""
    big = (tmp_path / "big", None, corpus[2])
    write_mixed_corpus(big[0] / "corpus", seed=3, files=40, per_file=60)
    reference = tmp_path / "reference"
    run_tinytrain("prepare", "--config", write_spec(big, reference, "ref.yaml"), cwd=tmp_path)
    out = tmp_path / "out"
    return write_spec(big, out), out, reference


def test_killed_run_resumes_keeping_finished_units(corpus, tmp_path):
    spec, out, reference = big_preparation(corpus, tmp_path)
    env = {**os.environ, "TINYTRAIN_CACHE": str(tmp_path / "cache")}
    _prepare_killed_after(spec, out / "web" / ".prep" / "unit-000002.json", tmp_path, env)
    assert not (out / "web" / "manifest.json").exists()
    done = json.loads((out / "web" / ".prep" / "unit-000000.json").read_text())
    first = out / "web" / done["train"][0]["file"]
    stamp = first.stat().st_mtime_ns
    # A finished unit whose shard was damaged afterwards is redone, not trusted.
    damaged = out / "web" / json.loads((out / "web" / ".prep" / "unit-000001.json").read_text())["train"][0]["file"]
    damaged.write_bytes(damaged.read_bytes()[:-2])

    proc = run_tinytrain("prepare", "--config", spec, cwd=tmp_path)
    assert "units already done and verified" in proc.stderr
    assert "unit 1 is redone" in proc.stderr
    assert first.stat().st_mtime_ns == stamp  # kept, not rewritten
    assert tree_digest(out) == tree_digest(reference)


def test_resume_with_changed_settings_is_refused(corpus, tmp_path):
    from tinytrain.data.prep import Filter, PrepSpec, Source, plan_for

    root, _, tok = corpus
    out = tmp_path / "out"
    # The plan an interrupted run of this spec (with eos false) leaves behind.
    src = Source(name="web", path=str(root / "corpus" / "web"),
                 filters=[Filter(field="meta.redpajama_set_name", drop=["RedPajamaGithub"])])
    spec = PrepSpec(out=str(out), tokenizer=str(tok.path), sources=[src], val_fraction=0.05, unit_bytes=8000,
                    shard_tokens=3000)
    (out / "web" / ".prep").mkdir(parents=True)
    (out / "web" / ".prep" / "plan.json").write_text(json.dumps(plan_for(src, spec, tok)))
    proc = run_tinytrain("prepare", "--config", write_spec(corpus, out), "--eos", "true", cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert "settings.eos: was False, now True" in proc.stderr and f"remove {out / 'web'}" in proc.stderr


@pytest.fixture
def small_disk(tmp_path):
    """48 KB: room for a few units' shards, not for the whole corpus."""
    yield from small_tmpfs(tmp_path, "48k")


def test_disk_full_is_a_clear_error_and_the_next_run_finishes(corpus, prepared_mix, small_disk, tmp_path):
    out = small_disk / "out"
    spec = write_spec(corpus, out)
    proc = run_tinytrain("prepare", "--config", spec, cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert "No space left on device while writing; nothing partial was kept" in proc.stderr
    assert re.search(rf"{re.escape(str(out))}/\S+: No space left on device", proc.stderr)  # names the file
    assert not list(out.rglob("*.tmp"))
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_disk)], check=True)
    run_tinytrain("prepare", "--config", spec, cwd=tmp_path)
    run_tinytrain("prepare", "--verify", out, cwd=tmp_path)
    ref = tree_digest(prepared_mix)
    assert {k: v for k, v in tree_digest(out).items() if not k.endswith("manifest.json")} == \
        {k: v for k, v in ref.items() if not k.endswith("manifest.json")}


def test_hub_style_dataset_is_streamed_one_unit_per_shard(corpus, tmp_path):
    """A dataset folder given as `hub:` goes through datasets.load_dataset(streaming=True), as a hub name would."""
    import shutil

    root, kept, tok = corpus
    ds = tmp_path / "ds"
    ds.mkdir()
    for name in ("part-01.jsonl.zst", "part-02.jsonl.gz", "sub/part-03.jsonl"):
        shutil.copy(root / "corpus" / "web" / name, ds / Path(name).name)
    spec = tmp_path / "hub.yaml"
    spec.write_text(f"out: {tmp_path / 'out'}\ntokenizer: {tok.path}\nval_fraction: 0.05\nsources:\n"
                    f"  - name: hub\n    hub: {ds}\n")
    run_tinytrain("prepare", "--config", spec, cwd=tmp_path, env={"HF_DATASETS_OFFLINE": "1"})
    manifest = shards.read_manifest(tmp_path / "out" / "hub")
    assert manifest["report"]["units"] == 3
    # datasets' JSON reader rejects the file with a bad byte as a whole (why local jsonl is parsed by
    # tinytrain); for a hub shard that is reported and the other shards go on.
    (problem,) = manifest["report"]["files_with_problems"]
    assert "ArrowInvalid" in problem["error"]
    assert manifest["documents"]["train"] + manifest["documents"]["val"] >= 80


def test_prepare_tokenizer_trains_llama_style_pieces(corpus, tmp_path):
    out = tmp_path / "own.model"
    spec = write_spec(corpus, tmp_path / "unused")
    proc = run_tinytrain("prepare", "tokenizer", "--config", spec, "--out", out, "--vocab_size", "400",
                         "--documents", "60", cwd=tmp_path)
    tok = Tokenizer(out)
    assert f"{out}: {tok.vocab_size} pieces" in proc.stdout
    assert tok.vocab_size == 400
    assert (tok.processor.unk_id(), tok.bos_id, tok.eos_id) == (0, 1, 2)
    ids = tok.encode("the model ✓")  # a character the sample never had: byte fallback, no unk
    assert 0 not in ids and tok.decode(ids) == "the model ✓"


def test_spec_errors_name_the_key(corpus, tmp_path):
    spec = write_spec(corpus, tmp_path / "out")
    proc = run_tinytrain("prepare", "--config", spec, "--workerz", "2", cwd=tmp_path, check=False)
    assert proc.returncode != 0 and "--workerz" in proc.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(spec.read_text().replace("name: code", "name: web"))
    proc = run_tinytrain("prepare", "--config", bad, cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "source names must be distinct" in proc.stderr
    missing = tmp_path / "missing.yaml"
    missing.write_text(spec.read_text().replace("/corpus/code", "/corpus/nowhere"))
    proc = run_tinytrain("prepare", "--config", missing, cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "corpus/nowhere does not exist" in proc.stderr


def test_the_spec_in_data_prep_readme_parses(tmp_path):
    import re

    from conftest import ROOT

    from tinytrain.commands.prepare import parse_spec

    text = (ROOT / "data_prep" / "README.md").read_text()
    blocks = [b for b in re.findall(r"```yaml\n(.*?)```", text, flags=re.S) if "sources:" in b]
    specs = []
    for i, block in enumerate(blocks):
        (tmp_path / f"spec{i}.yaml").write_text(block)
        specs.append(parse_spec(["--config", str(tmp_path / f"spec{i}.yaml")]))
    first, long_mix = sorted(specs, key=lambda spec: any(s.min_tokens for s in spec.sources))
    assert [s.name for s in first.sources] == ["web", "books"]
    assert first.sources[0].filters[0].keep == ["en"] and first.sources[1].val_fraction == 0.01
    assert [(s.name, s.min_tokens) for s in long_mix.sources] == [("slimpajama-long", 8192), ("slimpajama", 0)]


def _one_source_spec(tmp_path: Path, corpus, source_dir: Path, extra: str = "") -> Path:
    _, _, tok = corpus
    spec = tmp_path / "one.yaml"
    spec.write_text(f"out: {tmp_path / 'out'}\ntokenizer: {tok.path}\nval_fraction: 0.05\n{extra}"
                    f"sources:\n  - name: web\n    path: {source_dir}\n")
    return spec


def test_a_truncated_zst_file_is_reported_not_silently_shortened(corpus, tmp_path):
    """The zstd stream reader ended quietly inside a truncated frame: 1,024 of 3,000 documents and no
    report. A file that ends inside a frame is now a problem of that file, as a truncated .gz is."""
    import zstandard

    rng = random.Random(7)
    data = b"".join(json.dumps({"text": _text(rng)}).encode() + b"\n" for _ in range(3000))
    packed = zstandard.ZstdCompressor().compress(data)
    src = tmp_path / "src"
    src.mkdir()
    (src / "cut.jsonl.zst").write_bytes(packed[: len(packed) // 3])
    (src / "cut.jsonl.gz").write_bytes(gzip.compress(data, mtime=0)[: len(packed) // 3])
    run_tinytrain("prepare", "--config", _one_source_spec(tmp_path, corpus, src), cwd=tmp_path)
    report = json.loads((tmp_path / "out" / "web" / "manifest.json").read_text())["report"]
    problems = {p["file"]: p["error"] for p in report["files_with_problems"]}
    assert set(problems) == {"cut.jsonl.zst", "cut.jsonl.gz"}
    assert "ended inside a zstd frame" in problems["cut.jsonl.zst"] and "EOFError" in problems["cut.jsonl.gz"]
    strict = run_tinytrain("prepare", "--config", _one_source_spec(tmp_path, corpus, src, "strict: true\n"),
                           "--out", tmp_path / "strict", cwd=tmp_path, check=False)
    assert strict.returncode == 1 and "cut.jsonl" in strict.stderr and "cannot be read" in strict.stderr
    assert len(strict.stderr.strip().splitlines()[-1]) and "Traceback" not in strict.stderr


def test_a_byte_order_mark_does_not_cost_the_first_record(corpus, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(3)
    lines = [json.dumps({"text": _text(rng)}) for _ in range(20)]
    (src / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode() + b"\n")
    run_tinytrain("prepare", "--config", _one_source_spec(tmp_path, corpus, src), cwd=tmp_path)
    manifest = json.loads((tmp_path / "out" / "web" / "manifest.json").read_text())
    assert manifest["report"]["malformed_json"] == 0 and manifest["report"]["documents"] == 20


def _children(pid: int) -> list[int]:
    return [p["pid"] for p in processes() if p["ppid"] == pid]


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads /proc")
def test_workers_exit_when_their_parent_is_killed(corpus, tmp_path):
    big = (tmp_path / "big", None, corpus[2])
    write_mixed_corpus(big[0] / "corpus", seed=4, files=60, per_file=60)
    spec = write_spec(big, tmp_path / "out")
    proc = subprocess.Popen([sys.executable, "-m", "tinytrain", "prepare", "--config", str(spec), "--workers", "2"],
                            cwd=tmp_path, env={**os.environ, "TINYTRAIN_CACHE": str(tmp_path / "cache")},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    workers: list[int] = []
    while time.time() < deadline and len(workers) < 2:
        workers = _children(proc.pid)
        time.sleep(0.05)
    assert len(workers) >= 2, "the workers never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 20
    while time.time() < deadline and any(Path(f"/proc/{w}").exists() for w in workers):
        for w in workers:  # reap: they are ours to wait for only if re-parented to us; poll /proc
            try:
                os.waitpid(w, os.WNOHANG)
            except ChildProcessError:
                pass
        time.sleep(0.1)
    alive = [w for w in workers if Path(f"/proc/{w}").exists()
             and Path(f"/proc/{w}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"]
    assert not alive, f"workers {alive} outlived their parent"


def test_tasks_share_the_units_and_the_last_writes_what_one_machine_would(corpus, tmp_path):
    """Three tasks (as a SLURM array runs them): each prepares its units; one is killed and run
    again; --finalize names what is missing until every unit is done; the result is byte-identical
    to a one-process run."""
    spec, out, reference = big_preparation(corpus, tmp_path)
    for index in ("0", "2"):
        proc = run_tinytrain("prepare", "--config", spec, "--num_tasks", "3", "--task_index", index, cwd=tmp_path)
        assert proc.stdout.strip() == "" and "still to come" in proc.stderr
    env = {**os.environ, "TINYTRAIN_CACHE": str(tmp_path / "cache"), "SLURM_ARRAY_TASK_COUNT": "3",
           "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_MIN": "0"}  # the index from SLURM's variables
    _prepare_killed_after(spec, out / "web" / ".prep" / "unit-000004.json", tmp_path, env)
    assert not (out / "web" / "manifest.json").exists()

    early = run_tinytrain("prepare", "--config", spec, "--finalize", "--num_tasks", "3", cwd=tmp_path, check=False)
    last = early.stderr.strip().splitlines()[-1]
    assert early.returncode == 1 and last.startswith("tinytrain prepare: error: ")
    assert "units are not done yet" in last and "of tasks 1 of 3" in last
    assert not (out / "web" / "manifest.json").exists()

    again = subprocess.run([sys.executable, "-m", "tinytrain", "prepare", "--config", str(spec)], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "in task 1 of 3" in again.stderr  # it kept the units it had finished
    assert tree_digest(out) == tree_digest(reference)
    # finalize on a finished preparation only says so
    done = run_tinytrain("prepare", "--config", spec, "--finalize", cwd=tmp_path)
    assert "already prepared" in done.stderr


def test_task_index_out_of_range_is_refused(corpus, tmp_path):
    proc = run_tinytrain("prepare", "--config", write_spec(corpus, tmp_path / "out"), "--num_tasks", "3",
                         "--task_index", "3", cwd=tmp_path, check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == ("tinytrain prepare: error: --task_index must be in "
                                                    "[0, --num_tasks=3), got 3")


def test_min_tokens_keeps_only_long_documents(corpus, prepared_mix, tmp_path):
    """For a long-context mix: documents under min_tokens are left out and counted."""
    out = tmp_path / "out"
    spec = write_spec(corpus, out)
    spec.write_text(spec.read_text().replace("  - name: code\n", "  - name: code\n    min_tokens: 40\n"))
    run_tinytrain("prepare", "--config", spec, cwd=tmp_path)
    manifest, everything = shards.read_manifest(out / "code"), shards.read_manifest(prepared_mix / "code")
    tokens = np.concatenate([_split_tokens(out / "code", "train"), _split_tokens(out / "code", "val")])
    starts = np.flatnonzero(tokens == 1)  # BOS opens every document
    lengths = np.diff(np.append(starts, len(tokens)))
    assert starts[0] == 0 and lengths.min() >= 40
    kept = manifest["documents"]["train"] + manifest["documents"]["val"]
    assert kept == len(starts) and 0 < kept < everything["documents"]["train"] + everything["documents"]["val"]
    assert manifest["report"]["too_short"] == everything["documents"]["train"] + everything["documents"]["val"] - kept
    assert shards.read_manifest(out / "web")["report"]["too_short"] == 0
