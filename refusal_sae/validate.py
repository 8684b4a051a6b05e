"""Checks of config values, written once, with one message shape: "<option>: <value!r> <what is wrong>; <what to do>".

Configs call them in `__post_init__` (or their `__init__`), so a bad value stops the run where the config
is built, naming the option as the user writes it (`data.activations.batch_size`), before any stage runs.
Every check raises `UserError`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from refusal_sae.errors import UserError


def _is_int(value: object) -> bool:
    """An int that is not a bool (YAML's `true` must not pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    """An int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive_int(option: str, value: object, example: int) -> None:
    """`value` is an integer >= 1."""
    if not _is_int(value) or value < 1:
        raise UserError(f"{option}: {value!r} is not a positive integer; give e.g. {example}")


def non_negative_int(option: str, value: object, example: int) -> None:
    """`value` is an integer >= 0."""
    if not _is_int(value) or value < 0:
        raise UserError(f"{option}: {value!r} is not an integer >= 0; give e.g. {example}")


def positive_number(option: str, value: object, example: float) -> None:
    """`value` is a real number > 0."""
    if not _is_number(value) or not value > 0:
        raise UserError(f"{option}: {value!r} is not a positive number; give e.g. {example}")


def non_negative_number(option: str, value: object, example: float) -> None:
    """`value` is a real number >= 0."""
    if not _is_number(value) or not value >= 0:
        raise UserError(f"{option}: {value!r} is not a number >= 0; give e.g. {example}")


def fraction(option: str, value: object, example: float, *, include_one: bool = False) -> None:
    """`value` is a number in (0, 1), or in (0, 1] with `include_one`."""
    if not _is_number(value) or not (0 < value < 1 or (include_one and value == 1)):
        interval = "(0, 1]" if include_one else "(0, 1)"
        raise UserError(f"{option}: {value!r} is not a fraction in {interval}; give e.g. {example}")


def bootstrap_resamples(option: str, value: object) -> None:
    """`value` is an integer >= 100: fewer resamples give no usable 95% percentile interval."""
    positive_int(option, value, 2000)
    if value < 100:
        raise UserError(f"{option}: {value!r} resamples are too few for a 95% interval; give at least 100 "
                        "(default 2000)")


def statistics_options(section: str, cfg: object) -> None:
    """The statistics options the config `cfg` of `section` has, each checked alike wherever it appears: `bootstrap`
    resamples, interval `confidence`, `significance` level, the verdict thresholds `modular_below` <
    `monolithic_above`, and `seed`."""
    has = {f.name for f in dataclasses.fields(cfg)}
    if "bootstrap" in has:
        bootstrap_resamples(f"{section}.bootstrap", cfg.bootstrap)
    if "confidence" in has:
        fraction(f"{section}.confidence", cfg.confidence, 0.95)
    if "significance" in has:
        fraction(f"{section}.significance", cfg.significance, 0.05)
    if "modular_below" in has:
        below, above = cfg.modular_below, cfg.monolithic_above
        if not _is_number(below) or not 0 <= below < 1:
            raise UserError(f"{section}.modular_below: {below!r} is not a number in [0, 1); give e.g. 0.2")
        fraction(f"{section}.monolithic_above", above, 0.5, include_one=True)
        if below >= above:
            raise UserError(f"{section}.modular_below: {below} is not below monolithic_above {above}; give e.g. 0.2 "
                            "and 0.5")
    if "seed" in has:
        non_negative_int(f"{section}.seed", cfg.seed, 0)


def one_of(option: str, value: object, choices: Sequence[object]) -> None:
    """`value` is one of `choices`."""
    if value not in choices:
        raise UserError(f"{option}: {value!r} is not a known value; use one of {', '.join(map(str, choices))}")


def all_of(option: str, values: Sequence[object], choices: Sequence[object]) -> None:
    """`values` is a non-empty list whose every item is one of `choices`."""
    if isinstance(values, str) or not values:
        raise UserError(f"{option}: {values!r} is not a non-empty list; give some of {', '.join(map(str, choices))}")
    for value in values:
        one_of(option, value, choices)
