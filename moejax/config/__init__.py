"""Configs: the base groups and their defaults (base.py), validation before anything
is built (validation.py), what a resume may and may not change (resume.py),
`path.py:preset` specs loaded from code (files.py) and budget matching
(budget_match.py)."""

from moejax.config.base import base_config, parse_preset
from moejax.config.validation import (RESUME_FIXED_DATA, RESUME_FIXED_FIELDS,
                                      check_resume_compatible, check_same_data,
                                      resume_warnings, to_dict, validate)
