"""Command line: prepare a dataset, its tokenizer and token caches, offline.

  python3 -m moejax.data.prepare --dataset=stdlib_source [--data_dir=DIR]
      [--tokenizer=sentencepiece --vocab_size=2048]
  python3 -m moejax.data.prepare --dataset=files --files='/data/books/*.txt'
      [--eval_files=GLOB --eval_fraction=0.05 --txt_documents=file --text_key=text]

For a TFDS catalog dataset (e.g. lm1b), first build it with
`tfds build NAME --file_format=array_record --data_dir=DIR` (needs the network
and TensorFlow); this then trains the tokenizer and caches the token streams.
The library code is in preparation.py; nothing imports this module.
"""

from moejax.data import preparation
from moejax.errors import ConfigError


def main(argv=None) -> None:
  import argparse

  import ml_collections

  from moejax.config.base import base_config
  from moejax.config.validation import validate_data
  from moejax.data import check_ready, resolve_data_dir
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  defaults = base_config().data
  parser.add_argument("--dataset", default=defaults.name)
  parser.add_argument("--data_dir", default=defaults.data_dir)
  parser.add_argument("--tokenizer", default=defaults.tokenizer)
  parser.add_argument("--vocab_size", type=int, default=defaults.vocab_size)
  files_fields = ("files", "eval_files", "eval_fraction", "txt_documents", "text_key")
  for field in files_fields:  # --dataset=files (moejax/data/local_files.py)
    parser.add_argument(f"--{field}", type=type(defaults[field]), default=defaults[field])
  args = parser.parse_args(argv)
  cfg = ml_collections.ConfigDict(dict(defaults))
  cfg.name, cfg.data_dir = args.dataset, args.data_dir
  cfg.tokenizer, cfg.vocab_size, cfg.auto_prepare = args.tokenizer, args.vocab_size, True
  for field in files_fields:
    cfg[field] = getattr(args, field)
  try:
    validate_data(cfg)
    check_ready(cfg)
    preparation.prepare_all(cfg, resolve_data_dir(cfg))
  except ConfigError as e:
    raise SystemExit(f"config error: {e}") from None
  preparation.log(f"done: {cfg.name} is ready in {resolve_data_dir(cfg)}")


if __name__ == "__main__":
  main()
