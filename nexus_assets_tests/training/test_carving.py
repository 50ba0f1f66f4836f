"""Which teacher a tower is carved from; a tower that cannot be carved is refused with its families named."""
import pytest

from nexus_assets.core.registry import TeacherSpec
from nexus_assets.training.carving import carve_teacher


def _t(name, tower, family, modality="text", enabled=True):
    return TeacherSpec.model_validate({
        "name": name, "modality": modality, "tower": tower, "family": family, "capabilities": [f"{tower}.x{name}"],
        "dataset": "d", "source": {"kind": "path", "path": "/x"}, "enabled": enabled})


def test_the_first_carvable_teacher_of_the_tower_is_chosen():
    ts = [_t("enc", "text", "sentence_encoder"), _t("lm", "text", "causal_lm_gguf"), _t("v", "vision", "efficientnet_lite")]
    assert carve_teacher("text", ts).name == "lm"
    assert carve_teacher("vision", ts).name == "v"


def test_a_tower_without_a_carvable_family_is_refused_naming_it():
    ts = [_t("enc", "text", "sentence_encoder"), _t("lm", "text", "causal_lm", enabled=False)]
    with pytest.raises(ValueError, match=r"tower 'text': cannot be carved: its teachers' families \['sentence_encoder'\]"):
        carve_teacher("text", ts)
