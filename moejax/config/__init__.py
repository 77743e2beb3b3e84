"""Configs: the base groups and their defaults (base.py), validation before anything
is built (validation.py), what a resume may and may not change (resume.py),
`path.py:preset` specs loaded from code (files.py) and budget matching
(budget_match.py). Each paper's group lives in its own package (config.py there)."""

from moejax.config.base import base_config, parse_preset, to_dict
from moejax.config.resume import (RESUME_FIXED_DATA, RESUME_FIXED_FIELDS,
                                  check_resume_compatible, check_same_data, differences,
                                  resume_fixed_fields, resume_warnings, same_tokenizer)
from moejax.config.validation import profile_range, validate
