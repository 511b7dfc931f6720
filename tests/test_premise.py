"""The premise gates of docs/premise.md, read by experiments/premise.py, on runs made up to pass
or fail each one; and what a run records of its environment."""

import copy
import hashlib

import pytest
import torch

from experiments import environment
from experiments.premise import gates, passed

N = 30                                                          # test samples; SNR 0..29, thirds of 10


def run(acc, shares=None, noise=None, epochs=None, correct=None):
    """The parts of a metrics.json the gates read."""
    m = {"final": {"acc": {"clean": acc}}}
    if shares is not None:
        m["final"]["attention"] = {"clean": shares, "noise:audio": noise}
        m["epochs"] = [{"attention": s} for s in epochs]
    if correct is not None:
        m["correct"] = correct
    return m


def passing(seeds=3):
    """Runs that pass every gate: audio right on the top two SNR thirds only, attention stuck on audio."""
    stuck = {"audio": 0.7, "visual": 0.3}
    return {"audio alone": [run(0.80, correct="0" * 10 + "1" * 20) for _ in range(seeds)],
            "visual alone": [run(0.70) for _ in range(seeds)],
            "concat": [run(0.90 + 0.002 * s) for s in range(seeds)],
            "vanilla": [run(0.85, stuck, {"audio": 0.69, "visual": 0.31}, [stuck] * 10) for _ in range(seeds)]}


SNR = torch.arange(N, dtype=torch.float32)


def test_runs_made_to_pass_pass_every_gate():
    g = gates(passing(), SNR)
    assert passed(g) == list("abcde") and g["b"]["favoured"] == "audio"
    assert g["a"]["audio_acc_high_minus_low_third"] == pytest.approx(1.0)


def broken(change):
    runs = passing()
    change(runs)
    return passed(gates(runs, SNR))


def test_each_gate_fails_for_its_own_reason_and_only_that_one():
    def quality_blind(r):                                       # (a): audio right regardless of the SNR
        for x in r["audio alone"]:
            x["correct"] = "01" * 15

    def not_stuck(r):                                           # (b): the share follows audio's replacement by noise
        for x in r["vanilla"]:
            x["final"]["attention"]["noise:audio"] = {"audio": 0.6, "visual": 0.4}

    def weak_share(r):                                          # (b): 0.58 < 0.60
        for x in r["vanilla"]:
            x["final"]["attention"]["clean"] = {"audio": 0.58, "visual": 0.42}
            x["final"]["attention"]["noise:audio"] = {"audio": 0.58, "visual": 0.42}

    def reverses(r):                                            # (c): visual led at epoch 3 on one seed
        r["vanilla"][1]["epochs"][2] = {"attention": {"audio": 0.45, "visual": 0.55}}

    def early_reversal_is_allowed(r):                           # epochs 1 and 2 do not count
        r["vanilla"][1]["epochs"][1] = {"attention": {"audio": 0.45, "visual": 0.55}}

    def attention_level(r):                                     # (d): concat - vanilla straddles 0
        for s, x in enumerate(r["vanilla"]):
            x["final"]["acc"]["clean"] = 0.90 + 0.004 * (s - 1) ** 2 - 0.002

    def no_headroom(r):                                         # (e): audio alone 0.95 > 0.90, concat still 4 points above
        for x in r["audio alone"]:
            x["final"]["acc"]["clean"] = 0.95
        for x in r["concat"]:
            x["final"]["acc"]["clean"] += 0.09

    def concat_close(r):                                        # (e): concat only 0.02 above the better modality
        for x in r["audio alone"]:
            x["final"]["acc"]["clean"] = 0.885
    assert broken(quality_blind) == list("bcde")
    assert broken(not_stuck) == list("acde")
    assert broken(weak_share) == list("acde")
    assert broken(reverses) == list("abde")
    assert broken(early_reversal_is_allowed) == list("abcde")
    assert broken(attention_level) == list("abce")
    assert broken(no_headroom) == list("abcd")
    assert broken(concat_close) == list("abcd")


def test_seeds_that_favour_different_modalities_have_no_favoured_one():
    runs = passing()
    runs["vanilla"][2] = copy.deepcopy(runs["vanilla"][2])
    runs["vanilla"][2]["final"]["attention"]["clean"] = {"audio": 0.3, "visual": 0.7}
    g = gates(runs, SNR)
    assert g["b"]["favoured"] is None and not g["b"]["holds"] and not g["c"]["holds"]


def test_a_runs_environment_names_the_commit_the_datas_sha256_torch_and_the_thread_count(tmp_path):
    path = tmp_path / "d.npz"
    path.write_bytes(b"some data")
    env = environment(path)
    assert env["data_sha256"] == hashlib.sha256(b"some data").hexdigest()
    assert env["torch"] == torch.__version__ and env["threads"] == torch.get_num_threads()
    assert len(env["commit"].split("+")[0]) in (40, 7) or env["commit"].startswith("unknown")


def test_a_data_folders_digest_follows_its_files_names_sizes_and_contents(tmp_path):
    from experiments import data_digest
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "y.npy").write_bytes(b"0123")
    first = data_digest(tmp_path)
    (tmp_path / "train" / "y.npy").write_bytes(b"0124")
    second = data_digest(tmp_path)
    (tmp_path / "train" / "y.npy").rename(tmp_path / "train" / "z.npy")
    assert len({first, second, data_digest(tmp_path)}) == 3


def test_a_head_start_trains_the_named_encoder_alone_and_leaves_the_other_as_built():
    import argparse

    import train
    from experiments.study import warm_start
    from rollingq import Config, MultimodalTransformer
    g = torch.Generator().manual_seed(0)
    xs, y = [torch.randn(64, 3, 5, generator=g), torch.randn(64, 2, 4, generator=g)], torch.randint(0, 3, (64,), generator=g)
    torch.manual_seed(0)
    model = MultimodalTransformer(Config({"audio": (3, 5), "visual": (2, 4)}, 3, d_model=16, n_layers=1))
    before = [{k: v.clone() for k, v in enc.state_dict().items()} for enc in model.encoders]
    args = argparse.Namespace(**{**vars(train.parse_args([])), "pretrain_epochs": 2, "batch_size": 32})
    record = warm_start(args, torch.device("cpu"), ["audio"])(model, xs, y, xs, y)
    assert list(record["test_acc"]) == ["audio"] and record["recipe"]["epochs"] == 2
    moved = [any(not torch.equal(v, b[k]) for k, v in enc.state_dict().items()) for enc, b in zip(model.encoders, before)]
    assert moved == [True, False]


def test_a_studys_gates_read_its_vanilla_concat_and_its_premise_regimes_unimodal_runs(tmp_path):
    import json

    import numpy as np

    from experiments import study
    from experiments.premise import study_gates
    g = np.random.default_rng(0)
    data = tmp_path / "snr.npz"
    np.savez(data, train_y=g.integers(0, 3, 40), test_y=g.integers(0, 3, N),
             train_audio=g.standard_normal((40, 4, 5)), test_audio=g.standard_normal((N, 4, 5)),
             train_visual=g.standard_normal((40, 6)), test_visual=g.standard_normal((N, 6)),
             side_train_snr=g.standard_normal(40), side_test_snr=SNR.numpy())
    runs = passing()
    for r in runs["vanilla"]:
        r["config"] = {"data": str(data)}
    saved = {"report": {"tables": {study.CLOSEST: {}}},
             "runs": {study.CLOSEST: {"concat": runs["concat"], "attention (vanilla)": runs["vanilla"]},
                      "default": {"unimodal audio": runs["audio alone"], "unimodal visual": runs["visual alone"]}}}
    (tmp_path / "study.json").write_text(json.dumps(saved))
    report = study_gates(tmp_path / "study.json")
    assert passed(report[study.CLOSEST]) == list("abcde") and report[study.CLOSEST]["seeds"] == 3
    saved["runs"][study.CLOSEST]["concat"] = runs["vanilla"]      # concat no better than vanilla: (d) fails
    (tmp_path / "study.json").write_text(json.dumps(saved))
    assert passed(study_gates(tmp_path / "study.json")[study.CLOSEST]) == list("abce")


def test_the_speaker_head_start_trains_on_each_recordings_speaker_in_the_sets_order():
    import data as datasets
    from experiments.avdigits import SPEAKERS, SOURCE, recordings_split
    from experiments.premise import on_speakers, speakers
    d = datasets.avdigits_noisy(1)
    seen = []
    on_speakers(lambda model, xs, y, test_xs, test_y: seen.append((y, test_y)), d)(None, d.train_x, d.train_y,
                                                                                    d.test_x, d.test_y)
    (train_speaker, test_speaker), = seen
    assert len(train_speaker) == 2400 and len(test_speaker) == 600 and set(train_speaker.tolist()) == set(range(6))
    assert [int((train_speaker == s).sum()) for s in range(6)] == [400] * 6     # 10 digits x 40 recordings each
    assert train_speaker[:240].tolist() == [s for s in range(6) for _ in range(40)]   # by speaker within a digit
    if SOURCE.exists():                                                           # the build's own listing
        recordings, is_test = recordings_split()
        assert train_speaker.tolist() == [SPEAKERS.index(s) for (_, s, _), t in zip(recordings, is_test) if not t]
    d.train_y = d.train_y.flip(0)                                                 # not the box's order: refused
    with pytest.raises(Exception, match="order of recordings"):
        speakers(d)
