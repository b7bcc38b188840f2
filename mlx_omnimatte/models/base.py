"""What every model config shares: built from a converted directory's
config.json, which also holds fields that are not the architecture's
(component, dtype, source)."""

from __future__ import annotations

from dataclasses import asdict, fields


class BaseConfig:
    @classmethod
    def from_dict(cls, d: dict):
        known = {f.name for f in fields(cls)}
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in known})

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}
