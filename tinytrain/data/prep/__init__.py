"""Corpus preparation at scale: a YAML spec of sources -> one prepared folder per source.

    tinytrain prepare --config data_prep/tinyllama.yaml [--workers 64 --out /data/tinyllama ...]

Each source (a local folder of jsonl / jsonl.zst / jsonl.gz / parquet / txt files, or a dataset
on the Hugging Face Hub, streamed with `datasets`) becomes ``<out>/<name>/``: shards, the
tokenizer, and a manifest with documents, tokens, checksums, settings and a per-file report of
what was skipped. The work is cut into units (consecutive input files up to ``unit_bytes``, or
one shard of a hub dataset), and a unit's output depends on nothing but its input and the
settings, so:

- N worker processes produce byte-identical folders whatever N is;
- a finished unit is recorded in ``<out>/<name>/.prep/`` the moment its shards are on disk, and an
  interrupted run (killed, preempted, disk full) verifies those and does only the rest;
- several tasks (a SLURM array, or machines sharing a filesystem) each prepare the units whose id
  is their index modulo their count (`--num_tasks N --task_index I`); the task that finds every
  unit done, or `--finalize`, writes the manifest, the same bytes as one machine would;
- the held-out validation documents are chosen by a hash of (file, line), not by position in a
  worker's queue.

Documents are tokenized one by one (BOS in front by default, as in TinyLlama's published run;
EOS optional; both recorded in the manifest) and concatenated, never padded.

Reading: jsonl is parsed here, line by line, so a malformed line or a non-UTF-8 byte costs that
line only (`datasets`' JSON reader rejects the whole file); parquet is read by row group with
pyarrow (the columnar library `datasets` is built on), loading only the columns the spec needs;
hub datasets go through `datasets.load_dataset(..., streaming=True)`, one unit per shard.
"""

from tinytrain.data.prep.pipeline import Share, plan_for, plan_units, prepare, run_unit, source_files
from tinytrain.data.prep.readers import FORMATS, file_format
from tinytrain.data.prep.spec import PREP_VERSION, Filter, PrepError, PrepSpec, Source, is_validation, lookup
from tinytrain.data.prep.verify import prepared_folders, train_spec_tokenizer, verify_folder

__all__ = ["FORMATS", "PREP_VERSION", "Filter", "PrepError", "PrepSpec", "Share", "Source", "file_format", "is_validation",
           "lookup", "plan_for", "plan_units", "prepare", "prepared_folders", "run_unit", "source_files",
           "train_spec_tokenizer", "verify_folder"]
