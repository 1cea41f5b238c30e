"""bcc.state: the loop state and the RNG states a checkpoint restores first."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from bcc.state import TrainState, restore_rng_state, save_rng_state


def test_train_state_round_trip_and_unknown_key():
    s = TrainState(epoch=2, step=50, top_k=[{"step": 40, "metric": 0.7, "name": "step-00000040"}])
    assert TrainState.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    with pytest.raises(ValueError, match="unknown TrainState key.*'epochs'"):
        TrainState.from_dict({**s.to_dict(), "epochs": 3})
    with pytest.raises(ValueError, match="step"):
        TrainState.from_dict({"step": -1})


def test_rng_state_round_trips_every_generator():
    saved = save_rng_state()
    first = (torch.rand(3), random.random(), np.random.rand())
    restore_rng_state(saved)
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(first[0], again[0]) and first[1:] == again[1:]
