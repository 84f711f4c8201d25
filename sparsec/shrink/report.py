"""What shrink did, per channel space: the ShrinkReport the result carries (`cm.shrink_report`)."""
from __future__ import annotations

import collections
from dataclasses import dataclass, field

import networkx as nx

from sparsec.shrink.analysis import Analysis
from sparsec.shrink.decision import Decision


@dataclass
class SpaceReport:
    """One channel space: layers whose outputs share a channel set, and what shrink did to it.

    Channels are numbered in graph order of their producers: with one producer, channel i is its
    output i; producers joined by a residual add share the numbering of the first one."""
    producers: list[str]
    consumers: list[str]
    before: int
    after: int
    removed: list[int]
    kept: dict[str, list[int]] = field(default_factory=dict)  # reason -> channels kept for it
    feeds_output: bool = False   # the model returns these channels (so they are not hidden units)

    @property
    def name(self) -> str:
        return self.producers[0]


@dataclass
class ShrinkReport:
    spaces: list[SpaceReport]
    threshold: float

    @property
    def channels_before(self) -> int:
        return sum(s.before for s in self.spaces)

    @property
    def channels_after(self) -> int:
        return sum(s.after for s in self.spaces)

    @property
    def hidden_before(self) -> int:
        """Channels of spaces that do not reach the model output (hidden units)."""
        return sum(s.before for s in self.spaces if not s.feeds_output)

    @property
    def hidden_after(self) -> int:
        return sum(s.after for s in self.spaces if not s.feeds_output)

    def __getitem__(self, layer: str) -> SpaceReport:
        """The space a layer produces into."""
        for s in self.spaces:
            if layer in s.producers:
                return s
        raise KeyError(f"no channel space produced by {layer!r}; producers: {[p for s in self.spaces for p in s.producers]}")

    def __str__(self) -> str:
        header = ["space", "producers", "consumers", "before", "after", "removed"]
        rows = [[s.name, ",".join(s.producers), ",".join(s.consumers) or "-", str(s.before), str(s.after),
                 _ranges(s.removed) or "-"] for s in self.spaces]
        widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
        line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
        out = [f"sparsec shrink (threshold {self.threshold:g}): hidden units {self.hidden_before} -> "
               f"{self.hidden_after}, all channels {self.channels_before} -> {self.channels_after}",
               line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
        notes = [f"  {s.name} [{_ranges(idx)}]: {why}" for s in self.spaces for why, idx in s.kept.items()]
        if notes:
            out += ["kept, and why:"] + notes
        return "\n".join(out)


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    parts, start = [], None
    for i, v in enumerate(indices):
        if start is None:
            start = v
        if i + 1 == len(indices) or indices[i + 1] != v + 1:
            parts.append(str(start) if start == v else f"{start}-{v}")
            start = None
    return ",".join(parts)


def build_report(a: Analysis, d: Decision, threshold: float) -> ShrinkReport:
    spaces = nx.Graph()
    for name, _ in a.origin:
        spaces.add_node(name)
    for comp in d.classes:
        names = list(dict.fromkeys(a.origin[e][0] for e in sorted(comp)))
        spaces.add_edges_from(zip(names, names[1:]))
    first = {}
    for e, (name, _) in enumerate(a.origin):
        first.setdefault(name, e)
    consumers_of: dict[int, list[str]] = collections.defaultdict(list)
    for site in a.sites:
        if site.kind == "consumer":
            for k in {d.cls[e] for e in site.value.elems}:
                consumers_of[k].append(site.name)
    reports = []
    for names in sorted(nx.connected_components(spaces), key=lambda c: min(first[n] for n in c)):
        producers = sorted(names, key=first.get)
        classes = sorted({d.cls[e] for e in range(len(a.origin)) if a.origin[e][0] in names})  # channel order
        kept: dict[str, list[int]] = collections.defaultdict(list)
        removed = []
        for i, k in enumerate(classes):
            if d.removed(k):
                removed.append(i)
            else:
                kept[d.reasons[k]].append(i)
        consumers = list(dict.fromkeys(c for k in classes for c in consumers_of[k]))
        feeds_output = any(a.origin[e][0] in names for e in a.output_elems)
        reports.append(SpaceReport(producers, consumers, len(classes), len(classes) - len(removed), removed,
                                   dict(kept), feeds_output))
    return ShrinkReport(reports, threshold)

