"""Experiment 5: a second autoregressive domain, symbolic music.

Claim: GatedFWA's advantage (or lack of one) over the other kinds carries over from text to
another autoregressive domain.

The data is the corpus that the ``music21`` package ships (nothing is downloaded): by
default J. S. Bach's chorales and Palestrina's mass movements, parsed by music21 and
tokenised as note events, every part merged and sorted by onset, then pitch:

    [SHIFT(dt)]  PITCH(p)  DURATION(d)        per note (a chord gives one event per pitch)

dt (onset minus the previous onset, emitted only when > 0) and d are counted in twelfths of
a quarter note (which covers sixteenths and triplets); a shift longer than 4 quarter notes
takes several SHIFT tokens, durations are capped at 8 quarter notes. Each piece starts with
a PIECE token. Vocabulary: PIECE, 48 SHIFT, 128 PITCH, 96 DURATION tokens (273). Every 20th
piece (sorted by path) is held out, as the trainer holds out every 20th document.

``--prepare`` (needs music21) writes train.bin / val.bin (uint16 ids, the layout that
``gatedfwa train --data train.bin`` reads) and meta.json to ``--data-dir`` (default
benchmarks/experiments/data/music21, not tracked by git). The experiment then trains the
same model with every attention kind on it, through the same training code as
lm_equal_tokens, and compares held-out loss (bits per event token).

    python benchmarks/experiments/second_domain.py --prepare           # CPU, once (minutes)
    python benchmarks/experiments/second_domain.py --quick --out /tmp/exp   # a few chorales
    python benchmarks/experiments/second_domain.py                      # GPU, reads data-dir

A third domain is not included: no other sizeable sequence corpus ships offline with a
package at hand.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

import kit
import lm_equal_tokens

NAME = "second_domain"
CLAIM = "The comparison of attention kinds on text carries over to symbolic music (note events of the music21 corpus)."
DEFAULT_DATA_DIR = Path(__file__).resolve().parent / "data" / "music21"
FULL_COMPOSERS = ["bach", "palestrina"]
HELDOUT_EVERY = 20

# Token layout.
TICKS_PER_QUARTER = 12
MAX_SHIFT = 48  # ticks (4 quarter notes) per SHIFT token
MAX_DURATION = 96  # ticks (8 quarter notes)
PIECE = 0
SHIFT_BASE = 1  # SHIFT(dt) = SHIFT_BASE + dt - 1, dt in 1..MAX_SHIFT
PITCH_BASE = SHIFT_BASE + MAX_SHIFT  # PITCH(p) = PITCH_BASE + p, p in 0..127
DURATION_BASE = PITCH_BASE + 128  # DURATION(d) = DURATION_BASE + d - 1, d in 1..MAX_DURATION
VOCAB_SIZE = DURATION_BASE + MAX_DURATION


def ticks(quarter_length) -> int:
    return int(round(Fraction(quarter_length).limit_denominator(96) * TICKS_PER_QUARTER))


def note_events(score) -> list[tuple[int, int, int]]:
    """(onset tick, MIDI pitch, duration tick) of every sounding pitch, sorted by onset then
    pitch. Grace notes (zero duration) are left out."""
    events = []
    for element in score.flatten().notes:
        duration = ticks(element.duration.quarterLength)
        if duration <= 0:
            continue
        onset = ticks(element.offset)
        for pitch in element.pitches:
            events.append((onset, int(pitch.midi), duration))
    return sorted(events)


def encode(events: list[tuple[int, int, int]]) -> list[int]:
    """Token ids of one piece (see the module docstring)."""
    ids, previous = [PIECE], events[0][0] if events else 0
    for onset, pitch, duration in events:
        shift = onset - previous
        while shift > 0:
            step = min(shift, MAX_SHIFT)
            ids.append(SHIFT_BASE + step - 1)
            shift -= step
        previous = onset
        ids.append(PITCH_BASE + min(max(pitch, 0), 127))
        ids.append(DURATION_BASE + min(duration, MAX_DURATION) - 1)
    return ids


def prepare(data_dir: Path, composers: list[str], max_pieces: int | None = None, log=print) -> dict:
    """Parses the music21 corpus of ``composers`` and writes train.bin, val.bin, meta.json."""
    import music21
    from music21 import corpus

    started = time.monotonic()
    paths = sorted((p for c in composers for p in corpus.getComposer(c)), key=lambda p: str(p))
    if max_pieces is not None:
        paths = paths[:max_pieces]
    if not paths:
        raise RuntimeError(f"the music21 corpus has no pieces by {composers}")
    train, heldout, pieces, failed = [], [], 0, []
    for index, path in enumerate(paths):
        try:
            ids = encode(note_events(corpus.parse(path)))
        except Exception as error:  # a file music21 cannot read is reported and left out
            failed.append(f"{Path(path).name}: {type(error).__name__}: {error}")
            continue
        (heldout if index % HELDOUT_EVERY == HELDOUT_EVERY - 1 else train).extend(ids)
        pieces += 1
        if log and (index + 1) % 200 == 0:
            log(f"  {index + 1}/{len(paths)} pieces parsed ({time.monotonic() - started:.0f} s)")
    if not heldout:  # too few pieces for the every-20th rule: the last piece's share of the stream
        cut = len(train) - len(train) // HELDOUT_EVERY
        train, heldout = train[:cut], train[cut:]
    data_dir.mkdir(parents=True, exist_ok=True)
    np.asarray(train, dtype=np.uint16).tofile(data_dir / "train.bin")
    np.asarray(heldout, dtype=np.uint16).tofile(data_dir / "val.bin")
    meta = {"composers": composers, "pieces": pieces, "files": len(paths), "failed": failed,
            "train_tokens": len(train), "heldout_tokens": len(heldout), "vocab_size": VOCAB_SIZE,
            "ticks_per_quarter": TICKS_PER_QUARTER, "music21": music21.__version__,
            "prepare_s": time.monotonic() - started}
    (data_dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def config(quick: bool) -> dict:
    if quick:
        settings = {
            "model": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                      "num_key_value_heads": 2, "head_dim": 16, "window_size": 16, "rope_theta": 10000.0},
            "train": {"seq_len": 64, "batch_size": 4, "micro_batch_size": 4, "max_steps": 4, "lr": 3e-3,
                      "warmup_steps": 1, "eval_interval": 2, "eval_windows": 4},
            "grad_log_interval": 2, "compile": False,
        }
        return {"kinds": list(lm_equal_tokens.PAPER_KINDS), "seeds": [0, 1], "lm": settings, "composers": ["bach"],
                "max_pieces": 3, "data_dir": None}
    settings = {
        "model": {"hidden_size": 256, "intermediate_size": 704, "num_hidden_layers": 4, "num_attention_heads": 4,
                  "num_key_value_heads": 4, "head_dim": 64, "window_size": 128, "rope_theta": 10000.0},
        "train": {"seq_len": 1024, "batch_size": 32, "micro_batch_size": 32, "max_steps": 300, "lr": 2e-3,
                  "warmup_steps": 30, "eval_interval": 50, "eval_windows": 128},
        "grad_log_interval": 10, "compile": False,
    }
    return {"kinds": list(lm_equal_tokens.PAPER_KINDS), "seeds": [0, 1], "lm": settings, "composers": FULL_COMPOSERS,
            "max_pieces": None, "data_dir": str(DEFAULT_DATA_DIR), "budget_s": 90}


def ensure_data(config: dict) -> tuple[Path, dict]:
    """The data folder of the run: prepared now for --quick (a temporary folder), else
    read from config["data_dir"] (prepared there when music21 is installed)."""
    if config["data_dir"] is None:
        data_dir = Path(tempfile.mkdtemp(prefix="music21-events-"))
        return data_dir, prepare(data_dir, config["composers"], config["max_pieces"], log=None)
    data_dir = Path(config["data_dir"])
    if not (data_dir / "train.bin").is_file():
        try:
            import music21  # noqa: F401
        except ImportError:
            raise RuntimeError(
                f"{data_dir}/train.bin is missing and music21 is not installed: run "
                f"`python benchmarks/experiments/second_domain.py --prepare --data-dir {data_dir}` on a machine "
                f"with music21 (pip install music21) and bring the folder along") from None
        prepare(data_dir, config["composers"], config["max_pieces"], log=lambda line: print(line, file=sys.stderr))
    meta = json.loads((data_dir / "meta.json").read_text())
    if meta["composers"] != config["composers"]:
        raise RuntimeError(f"{data_dir} holds {meta['composers']}, the run wants {config['composers']}: prepare again")
    return data_dir, meta


def run(config: dict, record: kit.Record, deadline: kit.Deadline) -> None:
    data_dir, meta = ensure_data(config)
    record.results["data"] = meta
    config = {**config, "lm": {**config["lm"], "train": {**config["lm"]["train"], "data": [str(data_dir / "train.bin")]}}}
    lm_equal_tokens.compare_kinds(config, record, deadline)


def plot(record: kit.Record, png_path) -> None:
    meta = record.results.get("data", {})
    lm_equal_tokens.plot_comparison(record, png_path, what=f"Music ({', '.join(meta.get('composers', []))}, "
                                    f"{meta.get('pieces', '?')} pieces): held-out loss")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="second_domain.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    kit.add_common_options(parser)
    parser.add_argument("--prepare", action="store_true", help="only tokenise the music21 corpus into --data-dir")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--composers", nargs="+", default=FULL_COMPOSERS)
    args = parser.parse_args(argv)
    if args.prepare:
        meta = prepare(args.data_dir, args.composers)
        print(json.dumps({k: v for k, v in meta.items() if k != "failed"}, indent=1), f"\n{len(meta['failed'])} files failed")
        return meta
    config = kit.build_config(sys.modules[__name__], args.quick, args.kinds, args.seeds, args.device)
    if not args.quick:
        config.update(data_dir=str(args.data_dir), composers=args.composers)
    return kit.run_experiment(sys.modules[__name__], config, args.out, args.quick, kit.Deadline(args.budget_s))


if __name__ == "__main__":
    main()
