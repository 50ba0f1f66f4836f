"""Typed upstream artifacts: one partition's output and a {partition: output} mapping read the same way."""
from pathlib import Path

import pytest

from nexus_assets.defs.metadata import Artifact, upstream


def test_one_and_several_partitions_give_the_same_shape():
    one = {"path": "/a/x", "teacher": "x", "cache_key": "k1", "rows": 3}
    many = {"x": one, "y": {"path": "/a/y", "teacher": "y", "content_hash": "h2"}}
    assert upstream(one, "teacher", "teacher_features") == {"x": Artifact(Path("/a/x"), "x", "k1", one)}
    got = upstream(many, "teacher", "teacher_features")
    assert sorted(got) == ["x", "y"] and got["y"].content_hash == "h2" and got["y"].path == Path("/a/y")


def test_a_malformed_upstream_output_is_named():
    with pytest.raises(ValueError, match="input 'probe_dataset': an upstream output lacks 'path' or 'dataset'"):
        upstream({"text-probe": {"path": "/p"}}, "dataset", "probe_dataset")
    with pytest.raises(ValueError, match="input 'tower_adapter'"):
        upstream({"text": "not a dict"}, "tower", "tower_adapter")
