"""A synthetic world on disk that is not the one the config asks for is rendered again."""

from __future__ import annotations

import json
import logging

from fedumm.client.site import load_data
from fedumm.config import Config
from fedumm.data import synth


def _cfg(path, private: int, seed: int = 0, synthesize: bool = True) -> Config:
    return Config.model_validate(
        {
            "name": "x",
            "seed": seed,
            "data": {
                "path": str(path),
                "synthesize_if_missing": synthesize,
                "synth_images": {"public": 0, "private": private, "val": 1, "test": 1},
            },
            "federation": {"tasks": "understanding"},
        }
    )


def test_matching_world_is_reused(tmp_path, caplog):
    synth.synthesize(tmp_path, seed=0, images={"public": 0, "private": 2, "val": 1, "test": 1})
    before = (tmp_path / "world.json").stat().st_mtime_ns
    with caplog.at_level(logging.WARNING):
        data = load_data(_cfg(tmp_path, private=2))
    assert len(data.train) == 2 * 3
    assert (tmp_path / "world.json").stat().st_mtime_ns == before
    assert "re-rendering" not in caplog.text


def test_world_of_other_size_seed_or_format_is_rendered_again(tmp_path, caplog):
    synth.synthesize(tmp_path, seed=0, images={"public": 0, "private": 2, "val": 1, "test": 1})
    with caplog.at_level(logging.WARNING):
        data = load_data(_cfg(tmp_path, private=3))
    assert len(data.train) == 3 * 3 and "images per split" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_data(_cfg(tmp_path, private=3, seed=1))
    assert "seed 0" in caplog.text
    assert json.loads((tmp_path / "world.json").read_text())["seed"] == 1
    world = json.loads((tmp_path / "world.json").read_text())
    world["format_version"] = synth.FORMAT_VERSION - 1
    (tmp_path / "world.json").write_text(json.dumps(world))
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_data(_cfg(tmp_path, private=3, seed=1))
    assert f"format {synth.FORMAT_VERSION - 1}" in caplog.text
    assert json.loads((tmp_path / "world.json").read_text())["format_version"] == synth.FORMAT_VERSION


def test_world_is_left_alone_without_synthesize_if_missing(tmp_path):
    synth.synthesize(tmp_path, seed=0, images={"public": 0, "private": 2, "val": 1, "test": 1})
    data = load_data(_cfg(tmp_path, private=3, synthesize=False))
    assert len(data.train) == 2 * 3
