#!/bin/bash
# One-line changes of experiments/: the study's statistics and measures (each must make
# test_experiments.py fail), the noisy set's build (test_avdigits_noisy.py) and the premise
# search (test_premise.py).
# bash tests/mutations_experiments.sh (about a minute a change of the first kind, seconds one of the
# second). Each change is made to a copy of the repository in a fresh temporary folder; the
# repository's files are never edited.
cd "$(dirname "$0")/.."
status=0
run() {
  name="$1"; file="$2"; old="$3"; new="$4"; tests="${5:-tests/test_experiments.py}"
  dir=$(mktemp -d)
  tar -c --exclude=.git --exclude=__pycache__ --exclude=runs --exclude=.hypothesis --exclude=.pytest_cache . | tar -x -C "$dir"
  if ! python - "$dir/$file" "$old" "$new" <<'PY'
import sys
path, old, new = sys.argv[1:]
s = open(path).read()
if s.count(old) != 1:
    sys.exit(1)
open(path, 'w').write(s.replace(old, new))
PY
  then echo "STALE (the line to change is not in $file once): $name"; status=1; rm -rf "$dir"; return; fi
  if (cd "$dir" && timeout 600 python -m pytest -q -x -p no:cacheprovider "$tests" > log 2>&1); then
    echo "NOT CAUGHT: $name"; status=1
  else
    echo "caught: $name ($(grep -m1 FAILED "$dir/log"))"
  fi
  rm -rf "$dir"
}
S=experiments/study.py; M=experiments/measures.py; C=experiments/calibrate.py
run "t_0.975 for 10 seeds" $S "2.306, 2.262, 2.228" "2.306, 2.000, 2.228"
run "t_0.80 for 10 seeds" $S "0.889, 0.883, 0.879" "0.889, 0.842, 0.879"
run "the normal's quantile beyond the table" $S "(1.960, 0.842)" "(2.5, 0.842)"
run "the table reaches 30 degrees of freedom" $S "if 2 <= n <= 31 else" "if 2 <= n <= 30 else"
run "a zero difference shares no sign" $S "sum(x * mean > 0 for x in d)" "sum(x * mean >= 0 for x in d)"
run "probe standardised with the training statistics" $M "mu, sd = f_train.mean(0), f_train.std(0) + 1e-8" "mu, sd = f_test.mean(0), f_test.std(0) + 1e-8"
run "probe standardised" $M "torch.cat([(f - mu) / sd, f.new_ones(len(f), 1)], 1)" "torch.cat([f, f.new_ones(len(f), 1)], 1)"
run "probe's bias not penalised" $M "l2 * W[:-1].square().sum()" "l2 * W.square().sum()"
run "SNR r reads audio's share" $M 'shares[:, data.names.index("audio")]' 'shares[:, data.names.index("visual")]'
run "each encoder's own gradient share" $M "for enc in model.encoders])" "for enc in reversed(model.encoders)])"
run "each modality's own gradient share" $M "[s[j] for s in shares]" "[s[-1 - j] for s in shares]"
run "only the first right, the second wrong" $C "float((right[first] & ~right[second]).double().mean())" "float((right[first] & right[second]).double().mean())"
N=experiments/avdigits_noisy.py; T=tests/test_avdigits_noisy.py
run "test mixes take noise from the test span" $N "first = np.where(is_test, cut, 0)" "first = np.where(is_test, 0, 0)" $T
run "a noise segment fits in its span" $N "last = np.where(is_test, lengths[files], cut) - n" "last = np.where(is_test, lengths[files], cut)" $T
run "the SNR is a power ratio" $N "10 ** (snr / 10)" "10 ** (snr / 20)" $T
run "the SNR against the recording's power" $N "np.sqrt(np.mean(signal ** 2)" "np.sqrt(np.mean(clip ** 2)" $T
run "the PCA is centred" $N "    mean = x.mean(0)" "    mean = 0 * x.mean(0)" $T
run "the low-pass keeps the gain" $N "h / h.sum()" "h" $T
P=experiments/premise.py; T=tests/test_premise.py
run "gate (a): the high-SNR third minus the low" $P "float(right[thirds[1]].mean() - right[thirds[0]].mean())" "float(right[thirds[1]].mean())" $T
run "gate (a): 0.10" $P '"holds": statistics.mean(gaps) >= 0.10' '"holds": statistics.mean(gaps) >= 0.0' $T
run "gate (b): 0.60" $P "statistics.mean(clean) >= 0.60 and" "statistics.mean(clean) >= 0.55 and" $T
run "gate (b): the share lost as noise" $P "statistics.mean(drop) <= 0.02" "statistics.mean(drop) <= 0.2" $T
run "gate (b): the same modality on every seed" $P "fav = favoured.pop() if len(favoured) == 1 else None" "fav = favoured.pop()" $T
run "gate (c): from epoch 3" $P 'for e in r["epochs"][2:]) if fav else 0.0' 'for e in r["epochs"][0:]) if fav else 0.0' $T
run "gate (d): the interval's lower end" $P '"holds": d["ci"][0] > 0}' '"holds": d["mean"] > 0}' $T
run "gate (e): at most 0.90 alone" $P "0.55 <= mean[k] <= 0.90" "0.55 <= mean[k] <= 1.0" $T
run "gate (e): concat 3 points above" $P "mean[\"concat\"] >= better + 0.03" "mean[\"concat\"] >= better" $T
run "a head start trains the named encoder alone" $S "            if modalities is not None and name not in modalities:" "            if False:" $T
run "a study's gates read its own concat row" $P '"concat": runs[regime]["concat"], "vanilla": vanilla}' '"concat": vanilla, "vanilla": vanilla}' $T
run "the speaker head start trains on the speaker" $P 'hook(model, xs, labels["train"], test_xs, labels["test"])' 'hook(model, xs, y, test_xs, test_y)' $T
run "the speakers in the sets' order" $P 'for d in range(10) for s in range(len(SPEAKERS)) for i in range(50)]' 'for d in range(10) for i in range(50) for s in range(len(SPEAKERS))]' $T
run "the closest setting's head start: audio alone" $S '    head = [run_args.head_start] if' '    head = None if' tests/test_experiments.py
run "a trajectory's cell: the mean over seeds" experiments/trajectory.py 'statistics.mean(v[c] for v in values)' 'values[0][c]' tests/test_experiments.py
T=tests/test_measures.py; K=experiments/control.py
run "Fréchet: the cross term counts twice" $M "trace(c_b) - 2 * cross" "trace(c_b) - cross" $T
run "Fisher: both spreads" $M "/ (total_variance(a) + total_variance(b))" "/ (total_variance(a) + 1)" $T
run "permutation p: shuffles at least as large" $M "(torch.cat(null) >= value)" "(torch.cat(null) <= value)" $T
run "histogram overlap: the smaller of the two" $M "torch.minimum(p_a / p_a.sum()" "torch.maximum(p_a / p_a.sum()" $T
run "update share: each step's change" $M "(a - b).norm() for a, b in zip(now, self.before)" "a.norm() for a, b in zip(now, self.before)" $T
run "slope: cov over the variance of x" $M "float(x @ y / (x @ x))" "float(x @ y / (y @ y))" $T
run "uniform control: 1 / T" $K "v.new_full((B, self.n_heads, 1, T), 1 / T)" "v.new_full((B, self.n_heads, 1, T), 1 / (T - 1))" $T
run "uniform control: vanilla's initialisation" $K "    model.fusion.load_state_dict(fusion.state_dict())" "    pass" $T
exit $status
