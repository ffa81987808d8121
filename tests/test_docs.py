"""docs/configuration.md is what scripts/config_docs.py generates from the config classes, and every key has a
description."""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib

from train.config import SECTIONS, config_reference

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _config_docs():
    spec = importlib.util.spec_from_file_location("config_docs", ROOT / "scripts" / "config_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_config_key_is_documented():
    rows = {(section, key): description for section, key, _, _, description in config_reference()}
    expected = {(name, f.name) for name, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    assert set(rows) == expected
    assert not [k for k, d in rows.items() if not d.strip()], "keys without a description"


def test_configuration_page_matches_the_code():
    committed = (ROOT / "docs" / "configuration.md").read_text()
    assert committed == _config_docs().render(), "run: python scripts/config_docs.py"
