"""The small base every frozen config dataclass shares: `replace`, JSON-ready `to_dict` /
`from_dict` (tuples are written as lists and read back as tuples), the unknown-field check and the
one error helper, so every config reports bad input the same way: `Config.field=value: rule`."""
from __future__ import annotations

import dataclasses
from typing import NoReturn, TypeVar

C = TypeVar("C", bound="ConfigBase")


def _to_json(v):
    if isinstance(v, (tuple, list)):
        return [_to_json(x) for x in v]
    if isinstance(v, dict):
        return {k: _to_json(x) for k, x in v.items()}
    return v


def _from_json(v):
    """Lists (at any depth, not inside dicts) become tuples: the configs hold tuples only."""
    return tuple(_from_json(x) for x in v) if isinstance(v, list) else v


class ConfigBase:
    """Mixin for `@dataclass(frozen=True)` configs."""

    def replace(self: C, **kw) -> C:
        return dataclasses.replace(self, **kw)

    def to_dict(self) -> dict:
        return _to_json(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls: type[C], d: dict) -> C:
        cls.check_known_fields(d)
        return cls(**{k: _from_json(v) for k, v in d.items()})

    @classmethod
    def check_known_fields(cls, d: dict) -> None:
        """`from_dict` guard: an unknown key is an error naming it, never silently ignored."""
        if not isinstance(d, dict):
            raise ValueError(f"{cls.__name__}.from_dict: expected a dict of fields, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"{cls.__name__}.from_dict: unknown fields {unknown}")

    @classmethod
    def invalid(cls, field: str, value, rule: str) -> NoReturn:
        """Raise the one error a config gives for a bad field value."""
        raise ValueError(f"{cls.__name__}.{field}={value!r}: {rule}")
