"""Writes docs/configuration.md from the config dataclasses (train.config.config_reference), so it cannot drift.

    python scripts/config_docs.py          # rewrite docs/configuration.md
"""

from __future__ import annotations

import pathlib

from train.config import SECTIONS, config_reference

PATH = pathlib.Path(__file__).resolve().parents[1] / "docs" / "configuration.md"

INTRO = """# Configuration

Generated from the config classes by `python scripts/config_docs.py`; a test fails when this page and the code
differ. A run's YAML has one mapping per section; `zaya-train --set section.key=value` overrides any key, and an
unknown key is an error naming the closest valid ones. Model presets: `configs/zaya1-8b.yaml`,
`configs/zaya1-base.yaml`, `configs/tiny.yaml` (which also holds the README's training run).
"""

CLASSES = {name: f"`{cls.__module__}.{cls.__name__}`" for name, cls in SECTIONS.items()}


def render() -> str:
    out = [INTRO]
    section = None
    for name, key, type_name, default, description in config_reference():
        if name != section:
            section = name
            out += [f"\n## `{name}` ({CLASSES[name]})\n", "| key | type | default | what it does |", "|---|---|---|---|"]
        out.append(f"| `{key}` | `{type_name}` | `{default}` | {description.replace('|', '/')} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    PATH.write_text(render())
    print(f"wrote {PATH}")
