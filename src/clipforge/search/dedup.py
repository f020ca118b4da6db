"""Near-duplicate detection over an index: a by-product of nearest-neighbour search.

Each live item's vector is looked up among its ``neighbours`` nearest; pairs at cosine
>= ``threshold`` are joined (union-find) into groups. The lowest id, i.e. the first indexed,
is kept.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from clipforge.search.searcher import SearchIndex


@dataclass
class Group:
    keep: int
    members: list[int]  # sorted ids, keep first
    score: dict[int, float] = field(default_factory=dict)  # best similarity of each member within the group
    paths: dict[int, str] = field(default_factory=dict)


def find_duplicates(index_dir: str | Path, threshold: float = 0.96, neighbours: int = 10, batch: int = 2048,
                    progress: bool = True) -> list[Group]:  # fmt: skip
    index = SearchIndex(index_dir)
    parent: dict[int, int] = {}
    best: dict[int, float] = {}

    def find(x: int) -> int:
        while parent.get(x, x) != x:
            parent[x] = parent.get(parent[x], parent[x])  # path halving
            x = parent[x]
        return x

    with tqdm(total=len(index), unit="item", desc="dedup", disable=not progress) as bar:
        for rows in index.store.iter_live(batch):
            ids = [i for i, _ in rows]
            vecs = index.vectors(ids)  # [b, d]
            scores, found = index.search_ids(vecs, neighbours + 1)  # [b, n+1]
            for i, srow, jrow in zip(ids, scores.tolist(), found.tolist()):
                for s, j in zip(srow, jrow):
                    if j == i or j < 0 or s < threshold:
                        continue
                    a, b = find(i), find(j)
                    if a != b:
                        parent[max(a, b)] = min(a, b)
                    best[i] = max(best.get(i, -1.0), s)
                    best[j] = max(best.get(j, -1.0), s)
            bar.update(len(ids))
    members: dict[int, list[int]] = {}
    for x in best:
        members.setdefault(find(x), []).append(x)
    items = index.items(sorted(best))
    groups = []
    for root in sorted(members):
        m = sorted(members[root])
        paths = {i: items.get(i, {}).get("path", "") for i in m}
        groups.append(Group(m[0], m, {i: round(best[i], 6) for i in m}, paths))
    index.close()
    return groups


def write_groups(groups: list[Group], out: str | Path) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["group", "id", "path", "keep", "score"])
        for g_i, g in enumerate(groups):
            for i in g.members:
                w.writerow([g_i, i, g.paths.get(i, ""), int(i == g.keep), g.score.get(i, "")])


def drop_duplicates(index_dir: str | Path, groups: list[Group]):
    from clipforge.search.build import remove_ids

    return remove_ids(index_dir, [i for g in groups for i in g.members if i != g.keep], duplicates=True)


