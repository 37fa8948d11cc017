"""Shared fixtures: a small synthetic world and a freshly initialised tiny Janus checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY_IMAGES = {"public": 24, "private": 40, "val": 8, "test": 8}


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    """A small synthetic world (VQA v2 format) shared by the whole session."""
    from fedumm.data.synth import synthesize

    root = tmp_path_factory.mktemp("world")
    synthesize(root, seed=0, images=TINY_IMAGES)
    return root


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A randomly initialised tiny Janus saved as a HF directory (independent of the shipped one)."""
    from fedumm.data.synth import VOCABULARY
    from fedumm.models.janus.tiny import build_processor, build_tiny_janus, build_tokenizer

    root = tmp_path_factory.mktemp("janus-tiny")
    tok = build_tokenizer(VOCABULARY)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_tiny_janus(tok)
    model.save_pretrained(root)
    build_processor(tok).save_pretrained(root)
    return root


@pytest.fixture()
def tiny_config_tree(tiny_world, tiny_checkpoint) -> dict:
    """A 2-client, 2-round config over the tiny world and checkpoint (raw dict, for load_config(tree=...))."""
    return {
        "name": "tiny",
        "seed": 0,
        "data": {"path": str(tiny_world)},
        "model": {"path": str(tiny_checkpoint)},
        "lora": {"rank": 4, "alpha": 8},
        "train": {"batch_size": 8, "lr": 0.005, "eval_batch_size": 32},
        "federation": {"clients": 2, "alpha": 0.5, "min_partition_size": 8, "rounds": 2},
    }
