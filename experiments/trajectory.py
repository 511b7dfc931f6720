"""A row's measures epoch by epoch, from a study's study.json: vanilla's own trajectory first.

    python -m experiments.trajectory runs/study-closest/study.json
    python -m experiments.trajectory runs/study-closest/study.json --row "attention (vanilla)" --row "RollingQ, every epoch"

Reads what the study already measured after every epoch (train.run's epoch records and
measures.EpochMeasures: docs/premise.md, section 3) and prints, per regime and row, the mean
over seeds at epochs 1-5 and every 5th after: the test accuracy, the favoured modality's share of
the CLS attention, AIR (the last training batch's, as the roll reads it), key_gap (1 - cos of the
mean keys), and on the test tokens the Fréchet distance and Fisher ratio between the
modalities' fusion keys and the gap as the query sees it, mean cos(R q, k) of the favoured
modality's tokens minus the other modalities' (their mean), and the overlap of the cos
histograms. Trains nothing.
"""

import json
import statistics

import train

COLUMNS = ("test acc", "share", "AIR", "key_gap", "Fréchet", "Fisher", "cos gap", "cos overlap")


def epoch_values(record, favoured):
    """One epoch's record -> the columns' values (the key measures None where the row has none)."""
    gap = record.get("gap", {}).get("test")
    cos = gap["cos"] if gap else None                                 # modality -> mean cos(R q, k) of its tokens
    others = [c for m, c in cos.items() if m != favoured] if cos else None
    return {"test acc": record["test_acc"], "share": record.get("attention", {}).get(favoured),
            "AIR": record.get("air"), "key_gap": record.get("key_gap"),
            "Fréchet": gap and gap["frechet"], "Fisher": gap and gap["fisher"],
            "cos gap": cos and cos[favoured] - statistics.mean(others), "cos overlap": gap and gap["cos_overlap"]}


def shown_epochs(n):
    """1-5, then every 5th, and the last."""
    return sorted({e for e in range(1, n + 1) if e <= 5 or e % 5 == 0 or e == n})


def trajectory(runs, favoured):
    """runs: one row's metrics per seed -> {epoch: {column: mean over seeds, or None}}."""
    n = min(len(r["epochs"]) for r in runs)
    out = {}
    for epoch in shown_epochs(n):
        values = [epoch_values(r["epochs"][epoch - 1], favoured) for r in runs]
        out[epoch] = {c: statistics.mean(v[c] for v in values) if all(v[c] is not None for v in values) else None
                      for c in COLUMNS}
    return out


def markdown(regime, row, table, favoured, seeds):
    lines = [f"### {regime} | {row} (mean of {seeds} seeds; share: {favoured}'s)", "",
             "| epoch | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 1) + "|"]
    for epoch, values in table.items():
        cells = ["-" if v is None else f"{v:.3f}" for v in values.values()]
        lines.append(f"| {epoch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = train.ArgumentParser(prog="python -m experiments.trajectory", description=__doc__.split("\n")[0])
    p.add_argument("study_json", help="a study's study.json (python -m experiments.study --out DIR writes DIR/study.json)")
    p.add_argument("--row", action="append", metavar="NAME",
                   help="a row to print; repeat for more (default: attention (vanilla))")
    args = p.parse_args(argv)
    try:
        with open(args.study_json) as f:
            study = json.load(f)
        results, tables = study["runs"], study["report"]["tables"]
    except OSError as e:
        raise train.UsageError(f"{args.study_json}: {e.strerror}") from None
    except (ValueError, KeyError, TypeError):
        raise train.UsageError(f"{args.study_json}: not a study.json written by python -m experiments.study") from None
    for regime, table in tables.items():
        rows = results[regime]
        for row in args.row or ["attention (vanilla)"]:
            if row not in rows:
                raise train.UsageError(f"--row: no row {row!r} in regime {regime!r}; it has: {', '.join(rows)}")
            print(markdown(regime, row, trajectory(rows[row], table["favoured"]), table["favoured"], len(rows[row])) + "\n")


if __name__ == "__main__":
    train.cli(main=main)
