from __future__ import annotations

from pathlib import Path

import pytest

from nebula.catalog import load_catalog, parse_catalog
from nebula.errors import CatalogError, InvalidRequest, NotFound
from nebula.models import Task


def test_default_catalog_has_the_cpu_and_gpu_models() -> None:
    catalog = load_catalog()
    assert set(catalog) == {
        "smollm2_135m_chat",
        "minilm_l6_embedding",
        "qwen2_5_0_5b_chat",
        "qwen2_5_0_5b_embedding",
    }
    chat = catalog["smollm2_135m_chat"]
    assert chat.task is Task.CHAT and chat.prepared == "smollm2-135m-instruct"
    assert chat.cpu_memory_gib == 5
    embed = catalog["minilm_l6_embedding"]
    assert embed.task is Task.EMBEDDING and embed.cpu_memory_gib == 3
    qwen = catalog["qwen2_5_0_5b_chat"]
    assert qwen.gpu_memory_utilization == 0.4 and qwen.cpu_memory_gib is None
    assert catalog["qwen2_5_0_5b_embedding"].task is Task.EMBEDDING


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (
            'model = "x"\ncpu_memory_gib = 1\ncolour = "red"',
            "colour: Extra inputs are not permitted",
        ),
        ('model = "x"\ngpu_memory_utilization = 1.5', "gpu_memory_utilization"),
        ('model = "x"\ngpu_memory_utilization = 0', "greater than 0"),
        ('model = "x"', "set gpu_memory_utilization (GPU nodes), cpu_memory_gib, or both"),
        ('model = "x"\ncpu_memory_gib = 2\ntask = "rerank"', "task"),
        ("cpu_memory_gib = 2", "model: Field required"),
        (
            'model = "x"\ncpu_memory_gib = 2\nengine_args = ["--port", "9"]',
            "--port is set by Nebula itself",
        ),
        ('model = "x"\ncpu_memory_gib = 2\ntensor_parallel_size = 2', "needs GPUs"),
    ],
)
def test_malformed_entry_names_file_entry_and_reason(
    tmp_path: Path, body: str, reason: str
) -> None:
    path = tmp_path / "catalog.toml"
    path.write_text(f'[models.good]\nmodel = "ok"\ncpu_memory_gib = 1\n\n[models.broken]\n{body}\n')
    with pytest.raises(CatalogError) as err:
        load_catalog(path)
    message = err.value.message
    assert str(path) in message
    assert "entry 'broken'" in message
    assert reason in message


def test_bad_toml_and_bad_names_are_rejected() -> None:
    with pytest.raises(CatalogError, match="not valid TOML"):
        parse_catalog("[models.x\n", "c.toml")
    with pytest.raises(CatalogError, match="entry 'bad name'"):
        parse_catalog('[models."bad name"]\nmodel = "x"\ncpu_memory_gib = 1\n', "c.toml")
    with pytest.raises(CatalogError, match="unknown top-level key"):
        parse_catalog('[model.x]\nmodel = "x"\n', "c.toml")


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CatalogError, match=r"cannot read catalog .*nope\.toml"):
        load_catalog(tmp_path / "nope.toml")


def test_unknown_model_lists_known_ones() -> None:
    with pytest.raises(NotFound, match="known models: minilm_l6_embedding, qwen2_5"):
        load_catalog().get_spec("gpt-5")


def test_overrides_are_validated() -> None:
    catalog = load_catalog()
    spec = catalog.resolve("qwen2_5_0_5b_chat", {"gpu_memory_utilization": 0.25})
    assert spec.gpu_memory_utilization == 0.25
    assert spec.engine_args == ("--max-model-len", "8192")
    for bad in (0, 1.01, -0.5):
        with pytest.raises(InvalidRequest, match="gpu_memory_utilization"):
            catalog.resolve("qwen2_5_0_5b_chat", {"gpu_memory_utilization": bad})
    with pytest.raises(InvalidRequest, match="cannot override model"):
        catalog.resolve("qwen2_5_0_5b_chat", {"model": "other"})
    with pytest.raises(InvalidRequest, match="set by Nebula"):
        catalog.resolve("qwen2_5_0_5b_chat", {"engine_args": ["--api-key=x"]})


def test_the_test_engine_is_refused_unless_the_cluster_allows_it(tmp_path: Path) -> None:
    path = tmp_path / "catalog.toml"
    path.write_text('[models.fake]\nmodel = "fake"\nengine = "test"\ncpu_memory_gib = 0.1\n')
    with pytest.raises(CatalogError, match=r"fake use engine = \"test\".*ALLOW_TEST_ENGINE"):
        load_catalog(path)
    assert load_catalog(path, allow_test_engine=True)["fake"].engine == "test"
