"""Your own text files (`--config.data.name=files`): documents, the split, the
fingerprint, the errors, and a run of run.py, against references written here."""

import hashlib
import json
import logging
import os
import shutil
import sys

import numpy as np
import pytest

import moejax.data as data
from moejax import config as config_lib
from moejax.data import local_files, tfds_access
from moejax.errors import ConfigError
from tests.helpers import TINY_FLAGS, config_flags, run_py, tiny_config

# The folder every test starts from, and its documents counted by hand: text
# files are one document each (txt_documents=file), or one per blank-line block.
FOLDER = {
    "a.txt": "Alpha begins here.\nIt has two lines.\n",
    "b.md": "# Bee\n\nA markdown note.\n\n\n   indented para\n",
    "notes/c.txt": "Sea shanty.\n  \nSecond verse.\n",
    "notes/empty.txt": "",
    "sub/deep/d.jsonl": ('{"text": "json one", "id": 1}\n\n'
                         '{"text": "json two"}\n{"text": ""}\n{"text": "json three"}\n'),
}
BY_FILE = {  # documents of each file, in order, empty ones dropped
    "a.txt": ["Alpha begins here.\nIt has two lines.\n"],
    "b.md": ["# Bee\n\nA markdown note.\n\n\n   indented para\n"],
    "notes/c.txt": ["Sea shanty.\n  \nSecond verse.\n"],
    "sub/deep/d.jsonl": ["json one", "json two", "json three"],
}
BY_BLOCK = {
    "a.txt": ["Alpha begins here.\nIt has two lines."],
    "b.md": ["# Bee", "A markdown note.", "   indented para"],
    "notes/c.txt": ["Sea shanty.", "Second verse."],
    "sub/deep/d.jsonl": ["json one", "json two", "json three"],
}


def write_folder(root, files=FOLDER):
  for rel, text in files.items():
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode() if isinstance(text, str) else text)
  return root


def files_config(tmp_path, files, **overrides):
  return tiny_config(**{"data.name": "files", "data.files": str(files),
                        "data.tokenizer": "byte", "data.data_dir": str(tmp_path / "tfds"),
                        **overrides}).data


def expected_splits(by_file, fraction):
  """The split rule written out: sha256 of "path#index" as an integer, mod 10000."""
  out = {"train": [], "validation": []}
  for rel, docs in by_file.items():
    for i, text in enumerate(docs):
      h = int(hashlib.sha256(f"{rel}#{i}".encode()).hexdigest(), 16)
      out["validation" if h % 10000 < fraction * 10000 else "train"].append(text)
  return out


def prepared_splits(cfg):
  builder = tfds_access.builder_for(cfg, data.resolve_data_dir(cfg))
  return builder, {split: sorted(ex["text"].decode()
                                 for ex in builder.as_data_source(split=split))
                   for split in ("train", "validation")}


def config_error(fn, *args):
  with pytest.raises(ConfigError) as e:
    fn(*args)
  return str(e.value)


@pytest.mark.parametrize("txt_documents,by_file", [("file", BY_FILE),
                                                   ("blank_line", BY_BLOCK)])
def test_prepared_splits_hold_exactly_the_hand_counted_documents(tmp_path, caplog,
                                                                 txt_documents, by_file):
  folder = write_folder(tmp_path / "corpus")
  want = expected_splits(by_file, 0.5)
  assert want["train"] and want["validation"]  # the names above give both splits
  cfg = files_config(tmp_path, f"{folder}/*, {folder}/**/*.txt,{folder}/sub/**",
                     **{"data.eval_fraction": 0.5, "data.txt_documents": txt_documents})
  with caplog.at_level(logging.WARNING):
    data.check_ready(cfg)
    data.prepare(cfg)
  assert any("notes/empty.txt" in r.getMessage() for r in caplog.records)

  builder, got = prepared_splits(cfg)
  assert got == {k: sorted(v) for k, v in want.items()}
  meta = builder.info.metadata
  assert meta["root"] == str(folder) and meta["files"] == 5
  assert meta["skipped_empty_files"] == ["notes/empty.txt"]
  assert meta["documents"] == {k: len(v) for k, v in want.items()}
  assert builder.data_path.parent.name == meta["fingerprint"][:16]
  assert str(builder.data_path) == os.path.join(tmp_path, "tfds", "local_files",
                                                meta["fingerprint"][:16], "1.0.0")
  # The byte token stream: BOS, then the UTF-8 bytes, for each document.
  info = data.dataset_info(cfg)
  assert info["fingerprint"] == meta["fingerprint"]
  assert info["train_tokens"] == sum(len(t.encode()) + 1 for t in want["train"])
  assert info["eval_tokens"] == sum(len(t.encode()) + 1 for t in want["validation"])


def test_moving_the_folder_keeps_the_split_and_the_dataset(tmp_path):
  here = write_folder(tmp_path / "here")
  cfg = files_config(tmp_path, f"{here}/**/*", **{"data.eval_fraction": 0.5})
  data.prepare(cfg)
  fingerprint = data.dataset_info(cfg)["fingerprint"]
  shutil.move(str(here), str(tmp_path / "there"))
  moved = files_config(tmp_path, f"{tmp_path}/there/**/*", **{"data.eval_fraction": 0.5})
  builder = tfds_access.builder_for(moved, data.resolve_data_dir(moved))
  assert tfds_access.is_prepared(builder)  # the same content: nothing to prepare again
  assert builder.info.metadata["fingerprint"] == fingerprint
  assert prepared_splits(moved)[1] == {k: sorted(v) for k, v in
                                       expected_splits(BY_FILE, 0.5).items()}


def test_eval_files_are_the_validation_split(tmp_path):
  folder = write_folder(tmp_path / "corpus")
  cfg = files_config(tmp_path, f"{folder}/**/*",
                     **{"data.eval_files": f"{folder}/notes/c.txt,{folder}/a.txt"})
  data.prepare(cfg)
  _, got = prepared_splits(cfg)
  assert got["validation"] == sorted(BY_FILE["a.txt"] + BY_FILE["notes/c.txt"])
  assert got["train"] == sorted(BY_FILE["b.md"] + BY_FILE["sub/deep/d.jsonl"])


def test_parquet_documents_are_rows_of_the_text_column(tmp_path):
  pa = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq
  folder = write_folder(tmp_path / "corpus", {"a.txt": "plain text file\n"})
  rows = [f"parquet row {i}" for i in range(12)]
  pq.write_table(pa.table({"body": rows, "n": list(range(12))}), folder / "t.parquet")
  cfg = files_config(tmp_path, f"{folder}/*", **{"data.text_key": "body",
                                                 "data.eval_fraction": 0.3})
  data.prepare(cfg)
  want = expected_splits({"a.txt": ["plain text file\n"], "t.parquet": rows}, 0.3)
  assert prepared_splits(cfg)[1] == {k: sorted(v) for k, v in want.items()}
  msg = config_error(data.check_ready, files_config(tmp_path, f"{folder}/*"))
  assert f"{folder}/t.parquet has no column 'text' (it has ['body', 'n'])" in msg


def test_a_changed_file_is_a_new_dataset_and_refuses_the_old_checkpoint(tmp_path):
  folder = write_folder(tmp_path / "corpus")
  cfg = files_config(tmp_path, f"{folder}/**/*", **{"data.eval_fraction": 0.5})
  data.prepare(cfg)
  before = data.dataset_info(cfg)
  old = tfds_access.builder_for(cfg, data.resolve_data_dir(cfg))
  old_cache = data.RunData(cfg).cache_path("train")

  (folder / "a.txt").write_text("Alpha was rewritten, and is longer now.\n")
  new = tfds_access.builder_for(cfg, data.resolve_data_dir(cfg))
  assert new.info.metadata["fingerprint"] != before["fingerprint"]
  assert new.data_path != old.data_path and not tfds_access.is_prepared(new)
  data.prepare(cfg)
  after = data.dataset_info(cfg)
  assert data.RunData(cfg).cache_path("train") != old_cache
  assert sorted(os.listdir(tmp_path / "tfds" / "local_files")) == sorted(
      [before["fingerprint"][:16], after["fingerprint"][:16]])

  config_lib.check_same_data(after, after, "runs/x")  # unchanged: resumes
  msg = config_error(config_lib.check_same_data, before, after, "runs/x")
  assert "trained on other files" in msg and "data.files" in msg
  assert before["fingerprint"] in msg and after["fingerprint"] in msg

  # The split settings are part of the fingerprint too.
  other = files_config(tmp_path, f"{folder}/**/*", **{"data.eval_fraction": 0.4})
  assert (tfds_access.builder_for(other, data.resolve_data_dir(other)).info
          .metadata["fingerprint"] != after["fingerprint"])


def test_each_bad_input_is_one_sentence_naming_the_file_and_leaves_nothing(tmp_path):
  tfds_dir = tmp_path / "tfds"

  def refused(files, **overrides):
    cfg = files_config(tmp_path, files, **overrides)
    msg = config_error(data.prepare, cfg)
    assert config_error(data.check_ready, cfg) == msg
    assert not (tfds_dir / "local_files").exists() and not (tfds_dir / "moejax_cache").exists()
    assert "\n" not in msg and msg.endswith(".")
    return msg

  good = write_folder(tmp_path / "good", {"a.txt": "some text\n"})
  missing = f"{tmp_path}/nowhere/*.txt"
  assert f"the glob {missing!r} matches no file" in refused(f"{good}/*,{missing}")
  assert "folders" in refused(f"{tmp_path}/good")

  empties = write_folder(tmp_path / "empties", {"e.txt": "", "f.md": " \n\n", "g.jsonl": "\n"})
  assert "hold no text" in refused(f"{empties}/*")

  latin = write_folder(tmp_path / "latin", {"ok.txt": "fine\n", "l.txt": b"caf\xe9\nau lait\n"})
  msg = refused(f"{latin}/*")
  assert f"{latin}/l.txt" in msg and "offset 3 (line 1)" in msg and "convert it to UTF-8" in msg

  bad = write_folder(tmp_path / "badjson", {"a.jsonl": '{"text": "ok"}\n{"text": oops}\n'})
  msg = refused(f"{bad}/a.jsonl")
  assert f"{bad}/a.jsonl line 2 is not JSON" in msg
  nokey = write_folder(tmp_path / "nokey", {"a.jsonl": '{"text": "ok"}\n\n{"body": "x"}\n'})
  msg = refused(f"{nokey}/a.jsonl")
  assert f"{nokey}/a.jsonl line 3 has no 'text' field" in msg and "text_key" in msg

  one = write_folder(tmp_path / "one", {"a.txt": "a single document\n"})
  rel_hash = int(hashlib.sha256(b"a.txt#0").hexdigest(), 16) % 10000
  assert rel_hash >= 1  # so eval_fraction=1e-4 leaves it in train
  msg = refused(f"{one}/*", **{"data.eval_fraction": 1e-4})
  assert "validation split" in msg and "eval_fraction" in msg and "blank_line" in msg \
      and "eval_files" in msg

  msg = refused(f"{good}/*", **{"data.eval_files": f"{good}/a.txt"})
  assert "Every document" in msg and "none is left to train on" in msg

  both = write_folder(tmp_path / "both")
  cfg = files_config(tmp_path, f"{both}/**/*", **{"data.auto_prepare": False,
                                                  "data.eval_fraction": 0.5})
  assert (f"python3 -m moejax.data.prepare --dataset=files --data_dir={tfds_dir} "
          f"--files='{both}/**/*'") in config_error(data.check_ready, cfg)


def test_empty_files_field_and_bad_split_settings_are_refused_by_validation(tmp_path):
  def invalid(**overrides):
    cfg = tiny_config(**{"data.name": "files", **overrides})
    return config_error(lambda: config_lib.validate(cfg, num_devices=1, check_data=False))

  assert "needs --config.data.files" in invalid(**{"data.files": ""})
  for fraction in (0.0, 1.0, -0.5, 2.0):
    assert "eval_fraction" in invalid(**{"data.files": "x/*", "data.eval_fraction": fraction})
  assert "txt_documents='paragraph' is not one of ['file', 'blank_line']" in invalid(
      **{"data.files": "x/*", "data.txt_documents": "paragraph"})
  # The dataset's own fields are not checked for another dataset.
  config_lib.validate(tiny_config(**{"data.eval_fraction": 0.0}), num_devices=1,
                      check_data=False)


def test_parquet_without_pyarrow_says_how_to_install_it(tmp_path, monkeypatch):
  folder = write_folder(tmp_path / "corpus", {"a.txt": "text\n", "b.parquet": b"PAR1"})
  monkeypatch.setitem(sys.modules, "pyarrow", None)
  monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
  msg = config_error(data.check_ready, files_config(tmp_path, f"{folder}/*"))
  assert f"{folder}/b.parquet" in msg and "pip install pyarrow" in msg


def test_too_little_text_for_the_vocab_or_one_batch(tmp_path):
  folder = write_folder(tmp_path / "corpus", {f"{i}.txt": f"short text number {i}\n"
                                              for i in range(12)})
  cfg = files_config(tmp_path, f"{folder}/*", **{"data.tokenizer": "sentencepiece",
                                                 "data.vocab_size": 4096,
                                                 "data.eval_fraction": 0.3})
  msg = config_error(data.prepare, cfg)
  assert "too small for --config.data.vocab_size=4096; use at most" in msg
  tokenizers = tmp_path / "tfds" / "moejax_tokenizers"
  assert not tokenizers.exists() or not os.listdir(tokenizers)

  cfg = files_config(tmp_path, f"{folder}/*", **{"data.eval_fraction": 0.3})
  data.prepare(cfg)
  run_data = data.RunData(cfg)
  tokens = run_data.info["train_tokens"]
  msg = config_error(lambda: run_data.train_iterator(seq_len=16, global_batch=64, seed=0))
  assert f"holds {tokens:,} tokens" in msg and "global_batch=64" in msg \
      and f"= {64 * 17:,} tokens" in msg
  run_data.train_iterator(seq_len=16, global_batch=tokens // 17, seed=0)


def test_run_py_trains_on_a_folder_of_text_files(tmp_path):
  rng = np.random.default_rng(0)
  words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "far"]
  books = {f"books/{k}.txt": "\n\n".join(" ".join(rng.choice(words, 12)) + "."
                                         for _ in range(20)) for k in range(4)}
  folder = write_folder(tmp_path / "library", books)
  flags = {**TINY_FLAGS, "data.name": "files", "data.files": f"{folder}/books/*.txt",
           "data.txt_documents": "blank_line", "data.data_dir": str(tmp_path / "tfds"),
           "train.steps": 10, "train.log_every": 5, "checkpoint.every": 10,
           "train.final_eval_batches": 0}
  r = run_py([*config_flags(flags), f"--workdir={tmp_path / 'run'}"])
  assert r.returncode == 0, r.stderr[-3000:]
  final = json.loads((tmp_path / "run" / "final.json").read_text())
  assert final["status"] == "completed" and np.isfinite(final["eval/loss"])
  fp = final["dataset"]["fingerprint"]
  assert final["dataset"]["name"] == "files" and len(fp) == 64
  assert (tmp_path / "tfds" / "local_files" / fp[:16] / "1.0.0" / "corpus.json").exists()
  assert (tmp_path / "tfds" / "moejax_cache" / "files" / fp[:16]).is_dir()

  # The README's worked example goes on: score the checkpoint on the embedded
  # corpus and on the folder's validation split, then sample from it (in this
  # process: tests/test_evaluate.py and tests/test_sample.py run the commands).
  from moejax.evaluate import evaluate_run
  from moejax.sample import sample
  workdir = str(tmp_path / "run")
  quiet = dict(say=lambda _: None)
  embedded_dir = os.path.expanduser(os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")
  other = evaluate_run(workdir, dataset="stdlib_source", data_dir=embedded_dir, max_batches=2,
                       **quiet)
  assert other["dataset"]["name"] == "stdlib_source" and other["step"] == 10
  assert os.path.exists(os.path.join(workdir, "eval", "stdlib_source-validation-step10.json"))
  evaluate_run(workdir, **quiet)
  own = json.loads((tmp_path / "run" / "eval" /
                    f"files_{fp[:8]}-validation-step10.json").read_text())
  assert own["eval/loss"] == pytest.approx(final["eval/loss"], rel=1e-5)
  assert own["whole_split"] and own["dataset"]["fingerprint"] == fp
  drawn = sample(workdir, "the cat", max_new_tokens=16, **quiet)
  assert drawn["step"] == 10 and len(drawn["samples"]) == 1

  r = run_py([*config_flags({**flags, "data.files": f"{folder}/nothing/*.txt"}),
              f"--workdir={tmp_path / 'run2'}"])
  assert r.returncode == 2 and "Traceback" not in r.stderr
  assert f"the glob '{folder}/nothing/*.txt' matches no file" in r.stderr
