"""The DeepLog model as a library: anomaly scores, checkpoints that load with weights_only, JSON weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rankwatch.deeplog.evaluate import sequence_windows
from rankwatch.deeplog.model import (
    EOS,
    PAD,
    UNK,
    DeepLog,
    Vocabulary,
    fit_windows,
    load_checkpoint,
    save_checkpoint,
    weights_from_json,
    weights_to_json,
)


@pytest.fixture(scope="module")
def cycle_model():
    """A model that learned a strict cycle a b c d e (indices 2..6)."""
    vocab = Vocabulary(list("abcde"))
    seqs = [vocab.encode_many(list("abcde") * 6) for _ in range(4)]
    w, t, _ = sequence_windows(seqs, 4)
    model = DeepLog(len(vocab), 16, 32, 1, 0.0, window=4)
    model.reset_parameters(0)
    fit_windows(model, w, t, steps=400, batch_size=64, lr=1e-2)
    return model, vocab


def test_anomaly_score_is_zero_on_normal_and_positive_on_broken_order(cycle_model):
    model, vocab = cycle_model
    normal = vocab.encode_many("abcdeabcde")
    swapped = vocab.encode_many("abcdeabdce")
    unknown = vocab.encode_many("abcdeabcXe")
    assert unknown[8] == UNK
    scores = model.anomaly_score([normal, swapped, unknown], top_k=1)
    assert scores[0] == 0.0
    assert scores[1] > 0.0 and scores[2] > 0.0
    assert torch.equal(model.calculate_anomaly_score(torch.tensor([normal]), top_k=1), scores[:1])
    # padding is not a key: a shorter sequence in the same batch is judged on its own keys only
    flags, valid = model.key_flags([normal, normal[:4]], top_k=1)
    assert valid[1].sum() == 4 and not flags[1].any()


def test_anomaly_score_counts_keys_outside_top_k(cycle_model):
    model, vocab = cycle_model
    seq = vocab.encode_many("abcdeabdce")
    flags, _ = model.key_flags([seq], top_k=1)
    assert flags[0].tolist()[7:9] == [True, True]  # d after b, c after d
    assert model.anomaly_score([seq], top_k=len(vocab))[0] == 0.0  # every key is within the top |V|
    # ... unless a probability floor is asked for: the swapped keys are improbable, the cycle's are not
    assert model.anomaly_score([seq], top_k=len(vocab), min_prob=0.05)[0] > 0.0
    assert model.anomaly_score([vocab.encode_many("abcdeabcde")], top_k=len(vocab), min_prob=0.05)[0] == 0.0


def test_checkpoint_round_trip_loads_with_weights_only(tmp_path, cycle_model):
    model, vocab = cycle_model
    vocab.templates = {"a": "step <*> loss <*>"}
    opt = torch.optim.Adam(model.parameters())
    path = tmp_path / "m.pt"
    save_checkpoint(path, model, vocab, optimizer=opt, step=12, epoch=3, history={"train_loss": [1.0, 0.5]})
    raw = torch.load(path, weights_only=True)  # plain tensors and Python values only
    assert raw["step"] == 12 and raw["model_args"]["window"] == 4 and "optimizer_state_dict" in raw
    again, v2, ckpt = load_checkpoint(path)
    assert v2.keys == vocab.keys and v2.template(vocab.encode("a")) == "step <*> loss <*>"
    x = torch.tensor([vocab.encode_many("abcd")])
    assert torch.allclose(again(x), model(x))


def test_load_checkpoint_rejects_other_files(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError):
        load_checkpoint(tmp_path / "other.pt")


def test_weights_as_json(cycle_model):
    model, _ = cycle_model
    restored = weights_from_json(json.loads(json.dumps(weights_to_json(model))))
    for (k, a), (_, b) in zip(model.state_dict().items(), restored.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


def test_vocabulary():
    v = Vocabulary(["5", "22", EOS], {"5": "open"}, counts={"5": 3, "22": 1})
    assert v.encode("5") == 2 and v.encode("404") == UNK and v.decode(PAD) == "<pad>"
    assert v.encode_many([5, "22"]) == [2, 3]
    v2 = Vocabulary.from_dict(json.loads(json.dumps(v.to_dict())))
    assert v2.keys == v.keys and v2.counts == v.counts
    assert np.allclose(v2.base_rates()[[2, 3]], [0.75, 0.25])


def test_fit_is_deterministic_for_a_seed():
    w = np.random.default_rng(0).integers(2, 6, size=(50, 3))
    t = np.random.default_rng(1).integers(2, 6, size=50)
    outs = []
    for _ in range(2):
        m = DeepLog(6, 4, 8, 1, 0.0, window=3)
        m.reset_parameters(5)
        fit_windows(m, w, t, steps=20, batch_size=16, seed=3)
        outs.append(m(torch.as_tensor(w[:5])))
    assert torch.equal(outs[0], outs[1])
