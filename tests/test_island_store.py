"""GLOM's islands in the store: written level by level with parent links, an image's parse tree over REST equal to
`model.islands.parse_tree`, nearest islands of other images, the same kNN vote from the bank as from memory, rows
and bytes per image, and the experiment's metrics the same with USE_DB on and off."""

from __future__ import annotations

import numpy as np
import psycopg
import pytest

from eidetic.client import EideticAPIError, EideticClient
from eidetic.config import ClientSettings
from eidetic.wire.islands import island_bank_name
from model.island_memory import LocalIslands, StoredIslands, island_vote, storage_per_image
from model.islands import IslandTable, ParseNode, find_islands, parse_tree
from tests.helpers import error_of

HEIGHT, WIDTH, DIM, LEVELS = 4, 6, 8, 3
ISLAND_SET = "demo-train"


def part_state(n_images: int = 4, seed: int = 0) -> np.ndarray:
    """(B, 3, D, H, W): level 0 in four parts (left/right of a split that moves with the image, top/bottom),
    level 1 in the two halves of the split, level 2 whole; every kind of part has one prototype vector across
    images (parts look alike), plus a little noise."""
    rng = np.random.default_rng(seed)
    prototypes = rng.standard_normal((LEVELS, 4, DIM))
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH]
    state = np.zeros((n_images, LEVELS, DIM, HEIGHT, WIDTH))
    for image in range(n_images):
        right = xs >= 2 + image % 3
        kinds = [right + 2 * (ys >= 2), right.astype(int), np.zeros_like(xs)]
        for level, kind in enumerate(kinds):
            vectors = prototypes[level, kind] + 0.05 * rng.standard_normal((HEIGHT, WIDTH, DIM))
            state[image, level] = np.moveaxis(vectors, -1, 0)
    return state.astype(np.float32)


@pytest.fixture
def table() -> IslandTable:
    return find_islands(part_state(), threshold=0.9, iteration=4, labels=np.array([0, 1, 0, 1]))


@pytest.fixture
def client(service):
    with EideticClient(service.base_url, service.write_key) as client:
        yield client


@pytest.fixture
def stored(client, table) -> StoredIslands:
    run = client.create_run("glom-islands")
    islands = StoredIslands(client, run.id, ISLAND_SET)
    islands.add(table)
    return islands


def model_shape(node: ParseNode) -> tuple:
    row = node.island
    return (row.island, row.level, row.size, list(row.bbox), row.label, [model_shape(c) for c in node.children])


def rest_shape(node: dict) -> tuple:
    meta = node["meta"]
    children = [rest_shape(c) for c in node["children"]]
    return (meta["island"], node["level"], meta["size"], meta["bbox"], node["label"], children)


def test_every_level_is_a_bank_of_the_run_holding_one_item_per_island(client, stored, table):
    banks = client.island_banks(stored.run_id)
    assert [(b["island_set"], b["level"], b["size"]) for b in banks] == [
        (ISLAND_SET, level, len(table.of(level=level))) for level in range(LEVELS)
    ]
    assert {b["bank_id"] for b in banks} == set(stored.bank_ids.values())
    assert client.find_bank(f"run-{stored.run_id}/islands/{ISLAND_SET}/level-0") is not None


def test_the_parse_tree_of_a_stored_image_equals_the_models(client, stored, table):
    for sample in range(4):
        roots = client.island_tree(stored.run_id, ISLAND_SET, sample)
        assert [rest_shape(r) for r in roots] == [model_shape(r) for r in parse_tree(table, sample)]
    # four parts below two halves below the whole image
    (whole,) = client.island_tree(stored.run_id, ISLAND_SET, 0)
    assert [len(half["children"]) for half in whole["children"]] == [2, 2]
    assert {child["meta"]["parent"] for child in whole["children"]} == {whole["id"]}


def test_nearest_islands_are_parts_of_other_images_most_alike_first(client, stored, table):
    results = client.nearest_islands(stored.run_id, ISLAND_SET, sample=1, level=0, k=3)
    assert sorted(r["island"]["meta"]["island"] for r in results) == table.of(sample=1, level=0).tolist()
    others = np.setdiff1d(table.of(level=0), table.of(sample=1))
    for result in results:
        query = table.centroid[result["island"]["meta"]["island"]].astype(np.float64)
        scores = table.centroid[others].astype(np.float64) @ query
        expected = others[np.argsort(-scores, kind="stable")[:3]].tolist()
        assert [n["meta"]["island"] for n in result["neighbours"]] == expected
        assert all(n["meta"]["sample"] != 1 for n in result["neighbours"])
        assert np.allclose(
            [n["score"] for n in result["neighbours"]], np.sort(scores)[::-1][:3], atol=2e-3
        )  # keys on the grid
        assert result["neighbours"][0]["score"] > 0.95  # the same kind of part in another image


def test_nearest_islands_through_the_index_equal_the_exact_scan(client, stored):
    for level in range(LEVELS):
        for sample in (0, 3):
            indexed = client.nearest_islands(stored.run_id, ISLAND_SET, sample=sample, level=level, k=4)
            exact = client.nearest_islands(stored.run_id, ISLAND_SET, sample=sample, level=level, k=4, exact=True)
            assert [[n["id"] for n in r["neighbours"]] for r in indexed] == [
                [n["id"] for n in r["neighbours"]] for r in exact
            ]


def test_an_images_own_islands_nearest_of_all_do_not_make_the_answer_short(client, api):
    """Image 0's six islands are each other's nearest: the index's first hits are all left out, yet every island
    still gets k neighbours from other images, the ones an exact scan finds."""
    run = client.create_run("glom-crowd")
    bank = api.post(
        "/v1/memory-banks",
        json={"name": island_bank_name(run.id, "crowd", 0), "dim": 4, "capacity": 100, "policy": "none"},
    ).json()
    rng = np.random.default_rng(0)
    own = np.array([1.0, 0, 0, 0]) + 0.01 * rng.standard_normal((6, 4))
    others = np.array([0.5, 1.0, 0, 0]) + 0.5 * rng.standard_normal((30, 4))
    items = [{"key": key.tolist(), "label": 0, "meta": {"sample": 0}} for key in own]
    items += [{"key": key.tolist(), "label": 1, "meta": {"sample": i + 1}} for i, key in enumerate(others)]
    assert api.post(f"/v1/memory-banks/{bank['id']}/items", json={"items": items}).status_code == 200
    exact = client.nearest_islands(run.id, "crowd", sample=0, level=0, k=5, exact=True)
    indexed = client.nearest_islands(run.id, "crowd", sample=0, level=0, k=5)
    assert len(indexed) == 6
    for answer, truth in zip(indexed, exact):
        assert [n["meta"]["sample"] for n in answer["neighbours"]] == [n["meta"]["sample"] for n in truth["neighbours"]]
        assert len(answer["neighbours"]) == 5 and all(n["meta"]["sample"] != 0 for n in answer["neighbours"])
    # an image with one island, among 36: never short either
    (lone,) = client.nearest_islands(run.id, "crowd", sample=7, level=0, k=35)
    assert len(lone["neighbours"]) == 35 and {n["meta"]["sample"] for n in lone["neighbours"]} >= {0}


def test_the_banks_exact_search_votes_as_the_memory_does(stored, table):
    local = LocalIslands()
    local.add(table)
    queries = find_islands(part_state(seed=1), threshold=0.9)
    for level in range(LEVELS):
        asked = queries.centroid[queries.of(level=level)]
        for k in (1, 3, 5):
            assert stored.predictions(level, asked, k).tolist() == local.predictions(level, asked, k).tolist()
    # Centroids equal up to the last float bits, where float32 sums round apart: ties, broken by item order.
    alike = table.centroid + 1e-7 * np.random.default_rng(2).standard_normal(table.centroid.shape)
    for level in range(LEVELS):
        asked = alike[table.of(level=level)]
        assert stored.predictions(level, asked, 3).tolist() == local.predictions(level, asked, 3).tolist()
    top = queries.of(level=LEVELS - 1)
    votes = island_vote(queries, local.predictions(LEVELS - 1, queries.centroid[top], 3), 4, 2)
    assert votes.shape == (4,) and set(votes.tolist()) <= {0, 1}


def test_rows_and_bytes_per_image_are_reported_against_the_column_vectors(table):
    storage = storage_per_image(table, 4, DIM)
    assert storage["rows_per_image"] == len(table) / 4 == sum(storage["rows_per_image_by_level"])  # type: ignore[arg-type]
    assert storage["rows_per_image_by_level"] == [4.0, 2.0, 1.0]
    assert storage["column_vectors_per_image"] == LEVELS * HEIGHT * WIDTH
    assert storage["column_bytes_per_image"] == LEVELS * HEIGHT * WIDTH * DIM * 4
    assert 7 * (4 * DIM + 12) < storage["bytes_per_image"] < 7 * (4 * DIM + 12 + 300)  # type: ignore[operator]


def test_island_routes_refuse_what_is_not_there(api, stored):
    assert error_of(api.get(f"/v1/runs/{stored.run_id}/islands/nope/0/tree"))["field"] == "island_set"
    assert error_of(api.get(f"/v1/runs/{stored.run_id}/islands/{ISLAND_SET}/99/tree"))["field"] == "sample"
    missing_level = api.get(f"/v1/runs/{stored.run_id}/islands/{ISLAND_SET}/0/neighbours", params={"level": 9})
    assert error_of(missing_level)["field"] == "level"
    assert api.get(f"/v1/runs/{stored.run_id + 1}/islands").status_code == 404
    bad_name = api.get(f"/v1/runs/{stored.run_id}/islands/a b/0/tree")
    assert bad_name.status_code == 422 and error_of(bad_name)["field"] == "island_set"
    assert api.get(f"/v1/runs/{stored.run_id}/islands/{ISLAND_SET}/0/neighbours").status_code == 422  # level


def test_another_projects_key_sees_no_islands(service, stored):
    with EideticClient(service.base_url, service.new_key("beta", "admin")) as other:
        with pytest.raises(EideticAPIError) as refused:
            other.island_tree(stored.run_id, ISLAND_SET, 0)
    assert refused.value.status == 404


def bank_rows(database_url: str, bank_ids: list[int]) -> dict[str, int]:
    """What the database still holds of these banks: rows of each table keyed by bank, and item partitions."""
    with psycopg.connect(database_url) as conn:
        counts = {
            table: conn.execute(f"SELECT count(*) FROM {table} WHERE {column} = ANY(%s)", (bank_ids,)).fetchone()[0]
            for table, column in (
                ("memory_banks", "id"),
                ("memory_items", "bank_id"),
                ("memory_tombstones", "bank_id"),
                ("memory_hits", "bank_id"),
            )
        }
        names = [f"memory_items_b{bank_id}" for bank_id in bank_ids]
        partitions = "SELECT count(*) FROM unnest(%s::text[]) n WHERE to_regclass(n) IS NOT NULL"
        counts["partitions"] = conn.execute(partitions, (names,)).fetchone()[0]
    return counts


def test_deleting_a_run_deletes_its_island_banks_and_no_others(client, api, database_url, stored, table):
    kept = StoredIslands(client, client.create_run("glom-kept").id, ISLAND_SET)
    kept.add(table)
    other = api.post("/v1/memory-banks", json={"name": "not-islands", "dim": DIM, "capacity": 10}).json()
    doomed = sorted(stored.bank_ids.values())
    # hits, a tombstone and a change feed on the doomed banks
    top = stored.bank_ids[LEVELS - 1]
    assert api.post(f"/v1/memory-banks/{top}/search", json={"queries": [[1.0] * DIM], "k": 1}).status_code == 200
    (item,) = api.get(f"/v1/memory-banks/{top}/changes", params={"since": 0, "limit": 1}).json()["items"][:1]
    assert api.delete(f"/v1/memory-banks/{top}/items/{item['id']}").status_code == 200
    before = bank_rows(database_url, doomed)
    assert before["memory_hits"] == 1 and before["memory_tombstones"] == 1 and before["partitions"] == LEVELS

    assert api.delete(f"/v1/runs/{stored.run_id}").status_code == 204

    assert bank_rows(database_url, doomed) == dict.fromkeys(before, 0)
    assert all(api.get(f"/v1/memory-banks/{bank_id}").status_code == 404 for bank_id in doomed)
    assert api.get(f"/v1/runs/{stored.run_id}/islands").status_code == 404
    # the other run's island banks and the unrelated bank are untouched
    banks = client.island_banks(kept.run_id)
    assert [(b["level"], b["size"]) for b in banks] == [(lv, len(table.of(level=lv))) for lv in range(LEVELS)]
    assert client.island_tree(kept.run_id, ISLAND_SET, 0)
    assert api.get(f"/v1/memory-banks/{other['id']}").status_code == 200


def test_an_island_bank_needs_its_run_in_the_banks_project(service, api, stored):
    def create(name: str, key: str | None = None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return api.post("/v1/memory-banks", json={"name": name, "dim": DIM, "capacity": 10}, headers=headers)

    missing = create(f"run-{stored.run_id + 100}/islands/{ISLAND_SET}/level-0")
    assert missing.status_code == 422 and error_of(missing)["field"] == "name"
    assert f"run {stored.run_id + 100}" in error_of(missing)["message"]
    foreign = create(f"run-{stored.run_id}/islands/theirs/level-0", service.new_key("beta", "admin"))
    assert foreign.status_code == 422 and error_of(foreign)["field"] == "name"
    assert create(f"run-{stored.run_id}/islands/more/level-0").status_code == 201
    assert create(f"run-{stored.run_id + 100}/notes").status_code == 201  # not an island bank's name


@pytest.mark.usefixtures("one_torch_thread")
def test_the_experiment_gives_the_same_metrics_with_use_db_on_and_off(tmp_path, service, api):
    from model.experiments import glom as experiment

    config = experiment.GlomExperimentConfig(
        dataset="digits8",
        arms=("glom",),
        iterations=2,
        levels=3,
        hidden=8,
        epochs=1,
        train_limit=24,
        test_limit=12,
        island_images=2,
        island_k=3,
        progress=False,
    )
    timing = ("seconds", "island_latency_ms")
    found = {}
    for use_db in (False, True):
        settings = ClientSettings(use_db=use_db, eidetic_url=service.base_url, eidetic_api_key=service.write_key)
        out = tmp_path / str(use_db)
        summary = experiment.run_experiment(
            config.__class__(**{**config.__dict__, "out_dir": out, "run_name": f"glom-db-{use_db}"}), settings
        )
        result = summary["results"]["glom"]  # type: ignore[index]
        found[use_db] = {name: value for name, value in result.items() if name not in timing}
        assert (out / "islands.png").stat().st_size > 0
    assert found[True] == found[False]
    islands = found[True]["islands"]
    assert islands["memory_images"] == 24 and 0 < islands["rows_per_image"] < islands["column_vectors_per_image"]
    (run,) = [run for run in api.get("/v1/runs").json()["runs"] if run["name"] == "glom-db-True"]
    banks = api.get(f"/v1/runs/{run['id']}/islands").json()["banks"]
    assert [(b["island_set"], b["level"]) for b in banks] == [("glom-train", level) for level in range(3)]
    assert sum(b["size"] for b in banks) == round(islands["rows_per_image"] * 24)
    tree = api.get(f"/v1/runs/{run['id']}/islands/glom-train/0/tree").json()
    assert tree["roots"] and all(root["level"] == 2 for root in tree["roots"])
