"""docs/configuration.md, generated from `cluster/config.py` (the one place defaults live).

`python -m cluster.config_docs > docs/configuration.md` (or `make docs`) rewrites it; a test
fails when the file and the config disagree, so the page can never drift from the code.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from cluster.config import LongctxConfig

HEADER = """# Configuration

Every key of longctx's one configuration, generated from `cluster/config.py` by
`make docs` (`python -m cluster.config_docs`); do not edit by hand. A YAML file passed with
`--config` sets any of them (`section: {key: value}`); CLI flags override the file; unknown keys
are an error. In a Ray Serve config (`deployments/serve_config.yaml`, KubeRay's `serveConfigV2`)
the same mapping goes under the application's `args.config`, and `args.overrides` takes dotted
keys (`{"cache.block_size": 128}`). A `ByteSize` is a number of bytes or a string with a unit:
`64MiB`, `1GiB`, `512MB` (MB, GB: powers of 1000; MiB, GiB: of 1024).
"""


def render_configuration_markdown() -> str:
    parts = [HEADER]
    for section, field in LongctxConfig.model_fields.items():
        parts.append(_section(section, field.annotation))
    return "\n".join(parts)


def _section(name: str, model: type[BaseModel]) -> str:
    summary = " ".join((model.__doc__ or "").strip().split("\n\n")[0].split())
    rows = [f"## `{name}`", "", summary, "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    rows += [_row(key, field) for key, field in model.model_fields.items()]
    return "\n".join(rows) + "\n"


def _row(key: str, field: FieldInfo) -> str:
    meaning = (field.description or "").replace("|", "\\|")
    return f"| `{key}` | {_type_name(field.annotation)} | `{_default(field)}` | {meaning} |"


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if getattr(annotation, "__args__", None) is None else None
    text = text or str(annotation).replace("typing.", "")
    return text.replace("|", "or")


def _default(field: FieldInfo) -> str:
    default = field.get_default(call_default_factory=True)
    return json.dumps(list(default) if isinstance(default, tuple) else default)


if __name__ == "__main__":
    sys.stdout.write(render_configuration_markdown())
