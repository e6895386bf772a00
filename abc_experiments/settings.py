"""Which config keys define an experiment's results, as flat ``dotted.key -> value`` settings.

Shared by the runner (a resume must match the interrupted run's settings) and ``abc-report``
(jobs that differ in a setting other than the seed are different configurations). No torch or
Hydra import, so abc-report stays light.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping

# Keys that say where or how a run happens, not what it computes: a resume may change them. The
# same list is hydra.job.config.override_dirname.exclude_keys in conf/hydra/default.yaml (a test
# ties the two), so these keys never name a run dir either.
RUN_ONLY_KEYS = frozenset({"resume", "progress", "device", "run_dir", "cache_dir", "data.root", "data.download",
                           "data.verify", "data.num_workers", "pretrain.reuse", "pretrain.checkpoint"})


# Mappings that are ONE setting: abc.layers's keys are module-name patterns (dots in them) and its
# order matters (the first matching pattern wins), so it is compared and shown as a whole.
WHOLE_MAPPING_KEYS = frozenset({"abc.layers"})


def format_layer_precision(layers: Mapping | None) -> str:
    """An ``abc.layers`` mapping as one line in Hydra's override syntax, in its order, without the
    keys left to the global value: ``{layer1.*: {M: 5}, layer3.2.conv2: {M: 1, N: 1}}``; ``""``
    for none.

    Args:
        layers: pattern -> mapping with ``M`` and/or ``N`` (None values are left out).

    Returns:
        The text (``abc.layers=<text>`` on a command line gives the same mapping).
    """
    if not layers:
        return ""
    entries = []
    for pattern, values in layers.items():
        values = values if isinstance(values, Mapping) else {"?": values}
        inner = ", ".join(f"{key}: {value}" for key, value in values.items() if value is not None)
        entries.append(f"{pattern}: {{{inner}}}")
    return "{" + ", ".join(entries) + "}"


def flat_settings(config: Mapping, skip: frozenset[str] = RUN_ONLY_KEYS) -> dict:
    """``config`` flattened to ``{"abc.M": 3, ...}`` without the keys in ``skip``. A non-empty
    ``abc.layers`` is one setting, its :func:`format_layer_precision` text; an empty one is left
    out (the same as a config from before the key existed)."""
    flat: dict = {}

    def walk(node: Mapping, prefix: str) -> None:
        for key, value in node.items():
            name = f"{prefix}{key}"
            if name in WHOLE_MAPPING_KEYS:
                if value and name not in skip:
                    flat[name] = format_layer_precision(value) if isinstance(value, Mapping) else value
            elif isinstance(value, Mapping):
                walk(value, name + ".")
            elif name not in skip:
                flat[name] = value

    walk(config, "")
    return flat


def setting_differences(saved: Mapping, current: Mapping) -> list[str]:
    """``key: saved -> current`` for every flat setting that differs."""
    keys = sorted(set(saved) | set(current))
    return [f"{k}: {saved.get(k)!r} -> {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


def closest_key(key: str, valid_keys: Iterable[str]) -> str | None:
    """The valid key a mistyped ``key`` most likely meant, or None if none is close.

    Args:
        key: the dotted key as typed, e.g. ``"abc.m"``.
        valid_keys: the dotted keys that exist.

    Returns:
        A key of ``valid_keys``: the one equal to ``key`` but for case (``abc.m`` -> ``abc.M``),
        else the most similar one (ignoring case) if it is similar enough, else None.
    """
    valid = list(valid_keys)
    by_lower = {name.lower(): name for name in valid}
    if key.lower() in by_lower:
        return by_lower[key.lower()]
    matches = difflib.get_close_matches(key.lower(), list(by_lower), n=1, cutoff=0.6)
    return by_lower[matches[0]] if matches else None


def unknown_key_message(key: str, valid_keys: Iterable[str], what: str = "a config key") -> str:
    """``"abc.m is not a config key (did you mean abc.M?)"``, or without the guess if none is close."""
    guess = closest_key(key, valid_keys)
    return f"{key} is not {what}" + (f" (did you mean {guess}?)" if guess else "")
