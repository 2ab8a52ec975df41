"""The recipe section ``ipq`` (recipe_ipq.py): stages as globs, glob lists or mappings with PQ
overrides, PQ keys for every stage, per-stage fine-tuning; bad keys and values named before any work."""
import pytest

import slimtorch as st
from slimtorch.errors import ConfigError
from slimtorch.recipe import parse_recipe

pytestmark = pytest.mark.usefixtures("one_thread")

DOC = {"seed": 0, "data": {"name": "digits"}, "model": {"name": "digits_mlp"},
       "train": {"epochs": 1}}


def test_defaults_one_stage_of_every_layer():
    r = parse_recipe({**DOC, "ipq": {}})
    assert r.ipq == {"stages": [(("*",), st.PQ())], "exclude": None, "finetune": None, "steps": None,
                     "centroids_lr": None}
    assert parse_recipe(DOC).ipq is None


def test_stages_globs_lists_and_mappings_with_overrides():
    r = parse_recipe({**DOC, "ipq": {"stages": ["fc1", ["fc2", "fc3"], {"include": "fc3", "block_size": 2}],
                                     "n_centroids": 16, "n_iter": 5, "int8_centroids": True, "exclude": "fc9*",
                                     "finetune": {"epochs": 2, "lr": 0.01}, "centroids_lr": 0.1}})
    base = st.PQ(n_centroids=16, n_iter=5, int8_centroids=True)
    assert r.ipq["stages"] == [(("fc1",), base), (("fc2", "fc3"), base),
                               (("fc3",), st.PQ(n_centroids=16, n_iter=5, int8_centroids=True, block_size=2))]
    assert r.ipq["finetune"] == {"epochs": 2, "lr": 0.01} and r.ipq["centroids_lr"] == 0.1
    assert parse_recipe({**DOC, "ipq": {"method": "pq", "steps": 7}}).ipq["steps"] == 7


@pytest.mark.parametrize("section,match", [
    ({"n_centroid": 8}, r"ipq \(pq\): unknown key\(s\) \['n_centroid'\]"),
    ({"n_centroids": 1}, r"ipq \(pq\): PQ: n_centroids=1"),
    ({"method": "lsq"}, r"ipq: method 'lsq'; this section takes method pq only"),
    ({"stages": []}, r"ipq: stages: expected at least one stage"),
    ({"stages": [{"block_size": 4}]}, r"ipq.stages\[0\]: a stage mapping needs 'include'"),
    ({"stages": [{"include": "fc1", "blok": 4}]}, r"ipq.stages\[0\] \(pq\): unknown key\(s\) \['blok'\]"),
    ({"stages": [{"include": []}]}, r"ipq.stages\[0\].include: expected a glob or a non-empty list"),
    ({"stages": [3]}, r"ipq.stages\[0\]"),
    ({"finetune": {"epoch": 1}}, r"ipq.finetune: unknown key\(s\) \['epoch'\]"),
    ({"finetune": {"epochs": 1}, "steps": 5}, r"give finetune.epochs or steps \(per stage\), not both"),
    ({"steps": -1}, r"steps=-1"),
    ({"centroids_lr": 0.0}, r"centroids_lr=0.0"),
    ([1], r"ipq: expected a mapping"),
])
def test_bad_sections_name_the_problem(section, match):
    with pytest.raises(ConfigError, match=match):
        parse_recipe({**DOC, "ipq": section})
