"""Tokens/s of clipforge's tokenizer against OpenCLIP's on the same synthetic alt-text captions.

    .venv/bin/python benchmarks/bench_tokenizer.py [--captions 20000] [--reps 5]

Two regimes, each timed A B A B (order swapped every repetition) after a warm-up, medians reported:
  fresh   every repetition tokenizes a never-seen caption set from the same distribution; the
          word caches both tokenizers keep carry over, as when streaming through a dataset.
  repeat  the same caption set every repetition (the second epoch onwards).
Both sides produce identical tensors (asserted every repetition); tokens = non-pad ids incl. start/end.
"ratio" divides the median rates; "paired" is the median over repetitions of the two adjacent runs' ratio.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_name, save_record  # noqa: E402

import torch  # noqa: E402

COMMON = (
    "a an the of with and in on at for to by from two three four red blue green white black yellow "
    "small large big little old new young happy beautiful cute modern vintage abstract wooden metal "
    "photo photograph picture image illustration vector icon logo pattern drawing painting portrait "
    "view close-up closeup background texture set collection design template banner poster card "
    "man woman girl boy child children people family couple baby dog cat horse bird fish flower tree "
    "trees house building city street road car bike bicycle beach sea ocean water sky clouds sunset "
    "sunrise mountain mountains river lake forest park garden field grass snow winter summer spring "
    "autumn night light lights table chair room kitchen bedroom bathroom interior window door wall "
    "food plate coffee cup tea breakfast dinner fruit apple cake bread shirt dress shoes jacket hat "
    "fashion model wearing holding sitting standing walking running playing smiling looking "
    "isolated top side front back detail stock free download sale hd 4k high quality best cheap"
).split()
UNICODE = ["café", "naïve", "jalapeño", "Zürich", "São Paulo", "crème brûlée", "it’s", "“vintage”",
           "–", "…", "😀", "❤️", "👍", "日本", "München", "Ελλάδα", "Москва", "™", "©", "°C"]
ENTITIES = ["&amp;", "&#39;s", "&quot;", "&nbsp;", "&amp;amp;"]
ZIPF = [1.0 / (rank + 1) for rank in range(len(COMMON))]  # word frequency ~ 1/rank
SYLLABLES = "ka lo mi ne ra su tor vin zel bra cho dex fla gri hum jor kle mur nix pla qua ros sti".split()


def caption(rng: random.Random) -> str:
    """One alt-text-like caption of 10-30 words: Zipf-ish common words, some rare ones, some noise."""
    words = []
    for _ in range(rng.randint(10, 30)):
        r = rng.random()
        if r < 0.80:
            w = rng.choices(COMMON, weights=ZIPF)[0]
        elif r < 0.90:  # rare words, brand and place names: new to the caches
            w = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4)))
        elif r < 0.95:
            w = rng.choice([str(rng.randint(1, 2024)), f"IMG_{rng.randint(1000, 9999)}.jpg", f"{rng.randint(2, 99)}x"])
        else:
            w = rng.choice(["-", "|", "(stock)", "[HD]", "...", "!", "#photo", "@shop"])
        if rng.random() < 0.15:
            w = w.capitalize()
        words.append(w + ("," if rng.random() < 0.05 else ""))
    if rng.random() < 0.08:  # some captions carry non-ASCII text
        words.insert(rng.randrange(len(words) + 1), rng.choice(UNICODE))
    if rng.random() < 0.03:  # and some HTML entities
        words.insert(rng.randrange(len(words) + 1), rng.choice(ENTITIES))
    return " ".join(words)


def time_once(fn, texts) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    out = fn(texts)
    return time.perf_counter() - t0, out


def run_regime(name, sides, sets, reps) -> dict:
    times = {k: [] for k in sides}
    tokens = []
    for rep in range(reps):
        texts = sets[rep]
        order = list(sides) if rep % 2 == 0 else list(sides)[::-1]  # A B, then B A
        outs = {}
        for k in order:
            t, outs[k] = time_once(sides[k], texts)
            times[k].append(t)
        a, b = outs.values()
        assert torch.equal(a, b), f"{name}: outputs differ"
        tokens.append(int((a != 0).sum()))
    rates = {k: statistics.median(n / t for n, t in zip(tokens, times[k])) for k in sides}
    # Each repetition's two runs are adjacent in time, so their ratio is the least disturbed by
    # other load on a shared machine; report its median beside the ratio of median rates.
    paired = [o / c for c, o in zip(times["clipforge"], times["open_clip"])]
    return {
        "captions_per_rep": len(sets[0]),
        "tokens_per_rep": tokens,
        "seconds": {k: [round(t, 4) for t in v] for k, v in times.items()},
        "median_tokens_per_s": {k: round(v) for k, v in rates.items()},
        "ratio_clipforge_over_openclip": round(rates["clipforge"] / rates["open_clip"], 2),
        "paired_ratios": [round(r, 2) for r in paired],
        "paired_ratio_median": round(statistics.median(paired), 2),
    }



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--captions", type=int, default=20000)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    torch.set_num_threads(1)

    import open_clip
    from open_clip import tokenizer as oc_tokenizer

    from clipforge.model import tokenizer as cf_tokenizer

    rng = random.Random(args.seed)
    make = lambda: [caption(rng) for _ in range(args.captions)]  # noqa: E731
    warm, fresh, repeat = make(), [make() for _ in range(args.reps)], make()
    sides = {"clipforge": cf_tokenizer.tokenize, "open_clip": oc_tokenizer.tokenize}
    for fn in sides.values():  # warm-up: vocab load, allocator, caches of common words
        fn(warm)
    results = {
        "fresh": run_regime("fresh", sides, fresh, args.reps),
        "repeat": run_regime("repeat", sides, [repeat] * args.reps, args.reps),
    }

    print(f"{'regime':8} {'clipforge tok/s':>16} {'open_clip tok/s':>16} {'ratio':>7} {'paired':>7}")
    for name, r in results.items():
        m, ratio, paired = r["median_tokens_per_s"], r["ratio_clipforge_over_openclip"], r["paired_ratio_median"]
        print(f"{name:8} {m['clipforge']:>16,} {m['open_clip']:>16,} {ratio:>6.2f}x {paired:>6.2f}x")

    now = dt.datetime.now(dt.timezone.utc)
    record = {
        "benchmark": "tokenizer",
        "date": now.isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": f"cpu ({cpu_name()})",
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "data": f"{args.captions} synthetic alt-text captions of 10-30 words per set (seed {args.seed}): "
        "~80% common words, ~10% rare pseudo-words, numbers/file names, ~8% with non-ASCII, ~3% with HTML entities",
        "method": "warm-up on a separate set, then A B / B A alternating repetitions, medians; outputs asserted equal",
        "load_average_at_end": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "results": results,
    }
    path = save_record(record, "tokenizer", args.out, now)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
