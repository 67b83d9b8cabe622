"""The Prometheus text exposition parsed line by line, as a scraper sees it (not through our own
metric objects); shared by the metrics tests."""

from __future__ import annotations

import re

from prometheus_client.parser import text_string_to_metric_families

_TYPE = re.compile(r"^# TYPE (\S+) (\S+)$")
_HELP = re.compile(r"^# HELP (\S+) (.*)$")
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


class Exposition:
    """The exposition text parsed line by line (what a scraper sees), not through our own objects."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.types: dict[str, str] = {}
        self.helps: dict[str, str] = {}
        self.samples: list[tuple[str, dict[str, str], str]] = []
        for line in text.splitlines():
            if m := _TYPE.match(line):
                self.types[m.group(1)] = m.group(2)
            elif m := _HELP.match(line):
                self.helps[m.group(1)] = m.group(2)
            elif m := _SAMPLE.match(line):
                self.samples.append((m.group(1), dict(_LABEL.findall(m.group(2) or "")), m.group(3)))
            else:
                raise AssertionError(f"unexpected exposition line {line!r}")
        # Also a real parser must accept it.
        list(text_string_to_metric_families(text))

    def family_of(self, sample: str) -> str:
        for suffix in ("_bucket", "_sum", "_count", ""):
            if sample.endswith(suffix) and sample.removesuffix(suffix) in self.types:
                base = sample.removesuffix(suffix)
                if suffix == "" or self.types[base] == "histogram":
                    return base
        raise AssertionError(f"sample {sample} has no TYPE line")

    def label_names(self, family: str) -> frozenset[str]:
        names: set[str] = set()
        for sample, labels, _value in self.samples:
            if self.family_of(sample) == family:
                names |= set(labels) - {"le"}
        return frozenset(names)

    def value(self, metric: str, /, **labels: str) -> float:
        found = [v for n, ls, v in self.samples if n == metric and ls == labels]
        assert len(found) == 1, f"{metric}{labels}: {found}"
        return float(found[0])

    def le_values(self, family: str, **labels: str) -> list[str]:
        return [
            ls["le"]
            for n, ls, _ in self.samples
            if n == f"{family}_bucket" and {k: v for k, v in ls.items() if k != "le"} == labels
        ]
