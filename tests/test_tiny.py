import json

from run.tiny_base import base_manifest


def test_a_world_regenerated_in_place_by_another_generator_makes_the_tiny_base_stale(world, tmp_path):
    same_place = tmp_path / "world"
    same_place.mkdir()
    manifest = json.loads((world / "world.json").read_text())
    (same_place / "world.json").write_text(json.dumps(manifest))
    before = base_manifest(same_place)
    (same_place / "world.json").write_text(json.dumps({**manifest, "generator_version": "0.9"}))
    after = base_manifest(same_place)
    assert before["world"] == after["world"] and before != after
    assert before["world_generator"] == {key: manifest[key] for key in ("generator_version", "subjects", "seed")}
