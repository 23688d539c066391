"""Local real-data sources (issue 15, item 4): every source form loads as a DatasetDict keyed by split, a single
file serves only a one-split dataset, relative paths are relative to the params file that declares them, params
loading checks local files cheaply, sources load lazily, and a local source is keyed by content."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import DatasetDict

from nlsr_lib.cli import main
from nlsr_lib.config import ParamsError, load_params, params_from_dict
from nlsr_lib.data.loaders import (
    EXPECTED_COLUMNS,
    SPLITS,
    SourceError,
    check_local_source,
    file_columns,
    load_dataset_source,
    source_form,
    to_hub_schema,
)
from nlsr_lib.data.schemas import ALPACA, BEAVERTAILS, HARM_CATEGORIES, SAFERLHF
from nlsr_lib.data.tasks import TASKS
from nlsr_lib.runs import Run

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "params" / "smoke.yaml"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real data copies absent ({SHARED_DATA})")

ALPACA_ROWS = [{"instruction": "Say hi.", "input": "", "output": "Hi."},
               {"instruction": "Add.", "input": "1 and 2", "output": "3"}]
GSM8K_ROWS = [{"question": "1+1?", "answer": "#### 2"}, {"question": "2*3?", "answer": "#### 6"}]


def write(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` (gzip-compressed when the name ends in .gz)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as fh:
            fh.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def params_file(path: Path, sources: dict, extends: str | Path = SMOKE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"extends": str(extends), "data": {"sources": sources}}))  # JSON is YAML
    return path


# --------------------------------------------------------------------------------------------- forms
def test_the_needed_splits_are_the_splits_the_stages_index() -> None:
    for task in TASKS.values():  # a task evaluated on another source (Alpaca: AlpacaEval) indexes that one's split
        assert task.train_split in SPLITS[task.name] and task.eval_split in SPLITS[task.eval_source_name]
        assert (task.eval_source is None) == (SPLITS[task.name] == (task.train_split, task.eval_split))
    assert SPLITS["beavertails"] == ("30k_train", "30k_test") and SPLITS["alpaca"] == ("train",)
    assert set(SPLITS) == set(EXPECTED_COLUMNS)
    from nlsr_lib.data.loaders import HUB_IDS

    assert (HUB_IDS["beavertails"], HUB_IDS["pku_saferlhf"], HUB_IDS["alpaca"]) == (BEAVERTAILS, SAFERLHF, ALPACA)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".tsv", ".parquet"])
@pytest.mark.parametrize("gz", ["", ".gz"])
def test_a_single_file_of_every_type_is_the_one_split_of_alpaca(tmp_path, suffix, gz) -> None:
    path = tmp_path / f"alpaca{suffix}{gz}"
    if suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(ALPACA_ROWS), tmp_path / "plain.parquet")
        data = (tmp_path / "plain.parquet").read_bytes()
        path.write_bytes(gzip.compress(data) if gz else data)
    elif suffix in (".csv", ".tsv"):
        sep = "," if suffix == ".csv" else "\t"
        lines = [sep.join(ALPACA_ROWS[0])] + [sep.join(r.values()) for r in ALPACA_ROWS]
        write(path, "\n".join(lines) + "\n")
    else:
        write(path, jsonl(ALPACA_ROWS) if suffix == ".jsonl" else json.dumps(ALPACA_ROWS))
    assert source_form(str(path)) == "file"
    loaded = load_dataset_source("alpaca", str(path))
    assert isinstance(loaded, DatasetDict) and list(loaded) == ["train"]
    assert loaded["train"].to_list() == ALPACA_ROWS
    check_local_source("alpaca", str(path))
    assert file_columns("alpaca", path) == ["instruction", "input", "output"]


@pytest.mark.parametrize("name", [n for n in SPLITS if len(SPLITS[n]) > 1])
def test_a_single_file_for_a_dataset_of_several_splits_names_them_and_the_mapping(tmp_path, name) -> None:
    path = write(tmp_path / "data.jsonl", jsonl([dict.fromkeys(EXPECTED_COLUMNS[name], "x")]))
    splits = ", ".join(SPLITS[name])
    example = "{" + ", ".join(f"{s}: {s}.jsonl" for s in SPLITS[name]) + "}"
    message = f"{name} needs the splits {splits}, but {path} is one file; map each split to a file"
    for call in (load_dataset_source, check_local_source):
        with pytest.raises(SourceError) as err:
            call(name, str(path))
        assert message in str(err.value) and example in str(err.value)


def test_a_mapping_loads_each_split_from_its_file_and_names_wrong_splits(tmp_path) -> None:
    train = write(tmp_path / "train.jsonl", jsonl(GSM8K_ROWS))
    test = write(tmp_path / "test.jsonl.gz", jsonl(GSM8K_ROWS[:1]))
    loaded = load_dataset_source("gsm8k", {"test": str(test), "train": str(train)})
    assert list(loaded) == ["train", "test"]  # the order of SPLITS
    assert loaded["train"].to_list() == GSM8K_ROWS and loaded["test"].to_list() == GSM8K_ROWS[:1]
    with pytest.raises(SourceError, match=r"gsm8k: the mapping has no file for split\(s\) \['test'\]; gsm8k needs "
                                          r"exactly the splits train, test"):
        load_dataset_source("gsm8k", {"train": str(train)})
    with pytest.raises(SourceError, match=r"unknown split\(s\) \['validation'\]"):
        check_local_source("gsm8k", {"train": str(train), "test": str(test), "validation": str(test)})
    with pytest.raises(SourceError, match=r"gsm8k split 'test': .* is a directory; a split maps to one data file"):
        check_local_source("gsm8k", {"train": str(train), "test": str(tmp_path)})


def test_a_save_to_disk_folder_is_checked_from_its_metadata(tmp_path) -> None:
    ds = to_hub_schema("gsm8k", GSM8K_ROWS)
    DatasetDict({"train": ds, "test": ds}).save_to_disk(str(tmp_path / "gsm8k"))
    check_local_source("gsm8k", str(tmp_path / "gsm8k"))
    assert list(load_dataset_source("gsm8k", str(tmp_path / "gsm8k"))) == ["train", "test"]
    with pytest.raises(SourceError, match=r"has no split\(s\) \['validation'\]; sst2 needs train, validation"):
        check_local_source("sst2", str(tmp_path / "gsm8k"))
    DatasetDict({"train": ds, "validation": ds}).save_to_disk(str(tmp_path / "sst2"))
    with pytest.raises(SourceError, match=r"sst2 split 'train': .*lacks column\(s\) \['idx', 'sentence', 'label'\]; "
                                          r"found \['question', 'answer'\]"):
        check_local_source("sst2", str(tmp_path / "sst2"))
    with pytest.raises(SourceError, match="not one written by save_to_disk"):
        check_local_source("gsm8k", str(tmp_path / "gsm8k" / ".."))


def test_the_first_record_check_reads_only_the_start_of_a_json_list(tmp_path) -> None:
    rows = [{"question": "q" * 50_000, "answer": "#### 1"}] * 3  # the first record spans several read chunks
    path = write(tmp_path / "big.json", json.dumps(rows)[:-40])  # cut short: the end is never read
    assert file_columns("gsm8k", path) == ["question", "answer"]
    write(tmp_path / "empty.json", " [ ] ")
    with pytest.raises(SourceError, match="holds no records"):
        file_columns("gsm8k", tmp_path / "empty.json", "test")
    write(tmp_path / "obj.json", '{"question": "q"}')
    with pytest.raises(SourceError, match="must hold a list of records"):
        file_columns("gsm8k", tmp_path / "obj.json")


def test_missing_columns_name_the_source_split_file_and_the_columns_found(tmp_path) -> None:
    train = write(tmp_path / "train.tsv", "sentence\tlabel\nfine\t1\n")
    bad = write(tmp_path / "val.csv.gz", "sentence,score\nfine,1\n")
    p = params_file(tmp_path / "p.yaml", {"sst2": {"train": "train.tsv", "validation": "val.csv.gz"}})
    with pytest.raises(ParamsError) as err:
        load_params(p)
    assert str(err.value) == (f"data.sources.sst2: sst2 split 'validation': {bad} lacks column(s) ['label']; "
                              "found ['sentence', 'score']; sst2 needs ['idx', 'sentence', 'label']")
    write(bad, "text,score\nfine,1\n")  # no sst2 column: read as a headerless row, whose label is no label
    with pytest.raises(ParamsError, match=r"data.sources.sst2: sst2 split 'validation': .*val.csv.gz: the first row "
                                          r"\['text', 'score'\] is no header of sst2 columns: sst2 label 'score' is "
                                          r"not allowed"):
        load_params(p)
    params = load_params(params_file(p, {"sst2": {"train": "train.tsv", "validation": "train.tsv"}}))  # idx added
    assert params.data.sources.sst2 == {"train": str(train), "validation": str(train)}


@needs_shared
def test_real_gzip_jsonl_of_another_schema_is_refused_by_nlsr_params(tmp_path, capsys) -> None:
    hh = SHARED_DATA / "hh_rlhf_harmless_base" / "test.jsonl.gz"
    assert file_columns("pku_saferlhf", hh) == ["chosen", "rejected"]
    p = params_file(tmp_path / "p.yaml", {"pku_saferlhf": {"train": str(hh), "test": str(hh)}})
    assert main(["params", str(p)]) == 2
    err = capsys.readouterr().err
    assert "data.sources.pku_saferlhf: pku_saferlhf split 'train'" in err and "found ['chosen', 'rejected']" in err


@needs_shared
def test_real_copies_as_mappings(tmp_path) -> None:
    pku = SHARED_DATA / "pku_saferlhf_dpo_5k" / "pku_seferlhf_realign_dpo_5k.json"
    def files(folder: str, **splits: str) -> dict[str, str]:
        return {split: str(SHARED_DATA / folder / file) for split, file in splits.items()}

    sources = {"sst2": files("sst2", train="dev.tsv", validation="test.tsv"),
               "ag_news": files("ag_news", train="dev.tsv", test="test.tsv"),
               "gsm8k": files("gsm8k", train="train.jsonl", test="test.jsonl"),
               "pku_saferlhf": {"train": str(pku), "test": str(pku)}}
    params = load_params(params_file(tmp_path / "p.yaml", sources))  # header checks only
    assert params.data.sources.sst2 == sources["sst2"]
    sst2 = load_dataset_source("sst2", sources["sst2"])
    assert {s: len(d) for s, d in sst2.items()} == {"train": 6735, "validation": 872}
    assert sst2["validation"].column_names == ["idx", "sentence", "label"]
    ag = load_dataset_source("ag_news", sources["ag_news"])
    assert len(ag["test"]) == 7600 and set(ag["test"]["label"]) == {0, 1, 2, 3}
    assert {s: len(d) for s, d in load_dataset_source("gsm8k", sources["gsm8k"]).items()} == {"train": 7473,
                                                                                              "test": 1319}
    saferlhf = load_dataset_source("pku_saferlhf", sources["pku_saferlhf"])
    assert len(saferlhf["test"]) == 5135 and saferlhf["train"][0]["is_response_0_safe"] is True
    with pytest.raises(ParamsError, match=r"pku_saferlhf needs the splits train, test, but .* is one file"):
        load_params(params_file(tmp_path / "p.yaml", {"pku_saferlhf": str(pku)}))


# --------------------------------------------------------------------------------------------- where paths point
def test_relative_paths_are_relative_to_the_params_file_not_the_cwd(tmp_path, monkeypatch) -> None:
    data = write(tmp_path / "profile" / "data" / "alpaca.jsonl", jsonl(ALPACA_ROWS))
    p = params_file(tmp_path / "profile" / "p.yaml", {"alpaca": "data/alpaca.jsonl", "sst2": "sst2"})
    (tmp_path / "elsewhere" / "sst2").mkdir(parents=True)  # a folder named like a hub id in the cwd is not used
    monkeypatch.chdir(tmp_path / "elsewhere")
    params = load_params(p)
    assert params.data.sources.alpaca == str(data) and params.data.sources.sst2 == "sst2"
    monkeypatch.chdir(tmp_path / "profile" / "data")  # e.g. nlsr reproduce runs notebooks from notebooks/
    assert load_params(p).data.sources.alpaca == str(data)


def test_extends_resolves_each_value_against_the_file_that_declares_it(tmp_path, monkeypatch) -> None:
    parent_data = write(tmp_path / "shared" / "alpaca.jsonl", jsonl(ALPACA_ROWS))
    train = write(tmp_path / "child" / "gsm8k" / "train.jsonl", jsonl(GSM8K_ROWS))
    parent = params_file(tmp_path / "shared" / "base.yaml", {"alpaca": "./alpaca.jsonl",
                                                             "gsm8k": {"train": "alpaca.jsonl", "test": "x.jsonl"}})
    write(tmp_path / "shared" / "x.jsonl", jsonl(GSM8K_ROWS))
    child = params_file(tmp_path / "child" / "p.yaml", {"gsm8k": {"train": "gsm8k/train.jsonl"}},
                        extends="../shared/base.yaml")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ParamsError, match=r"gsm8k split 'train'.*lacks column"):
        load_params(parent)  # the parent's own gsm8k train file is Alpaca data
    params = load_params(child)
    assert params.data.sources.alpaca == str(parent_data)
    assert params.data.sources.gsm8k == {"train": str(train), "test": str(tmp_path / "shared" / "x.jsonl")}


@pytest.mark.parametrize("value", ["./absent.jsonl", "absent.tsv.gz", "../absent", "~/surely/absent/nlsr.csv"])
def test_a_path_that_does_not_exist_is_named_by_nlsr_params(tmp_path, capsys, value) -> None:
    p = params_file(tmp_path / "p.yaml", {"alpaca": value})
    assert main(["params", str(p)]) == 2
    err = capsys.readouterr().err.strip()
    if value.startswith("~"):
        where = f"{Path(value).expanduser()}"  # absolute: no folder to be relative to
    else:
        where = f"{(tmp_path / value).resolve()} (relative to {tmp_path}, the folder of p.yaml, which declares it)"
    assert err == f"[nlsr] error: data.sources.alpaca: local path {value!r} does not exist: looked for {where}"


def test_a_split_of_a_mapping_must_be_a_local_file(tmp_path) -> None:
    p = params_file(tmp_path / "p.yaml", {"gsm8k": {"train": "openai/gsm8k", "test": "openai/gsm8k"}})
    with pytest.raises(ParamsError, match=r"data.sources.gsm8k.train: local path 'openai/gsm8k' does not exist: .*"
                                          r"a split of a mapping names a local file"):
        load_params(p)


def test_source_values_must_be_strings_or_mappings_of_strings(tmp_path) -> None:
    with pytest.raises(ParamsError, match=r"data.sources.sst2: expected 'synthetic', a hub id, a local path or a "
                                          r"mapping of split name to file \(e.g. \{train: train.jsonl"):
        params_from_dict({"data": {"sources": {"sst2": 3}}})
    with pytest.raises(ParamsError, match=r"data.sources.sst2.train: expected the path of a data file, got 5"):
        params_from_dict({"data": {"sources": {"sst2": {"train": 5}}}})
    with pytest.raises(ParamsError, match=r"data.sources.sst2: expected .*got \{\}"):
        params_from_dict({"data": {"sources": {"sst2": {}}}})


def test_overrides_and_dicts_resolve_against_the_cwd(tmp_path, monkeypatch) -> None:
    write(tmp_path / "a.jsonl", jsonl(ALPACA_ROWS))
    write(tmp_path / "g.jsonl", jsonl(GSM8K_ROWS))
    monkeypatch.chdir(tmp_path)
    assert load_params(SMOKE, {"data.sources.alpaca": "a.jsonl"}).data.sources.alpaca == str(tmp_path / "a.jsonl")
    over = load_params(SMOKE, {"data.sources.gsm8k.train": "g.jsonl", "data.sources.gsm8k.test": "./g.jsonl"})
    assert over.data.sources.gsm8k == dict.fromkeys(("train", "test"), str(tmp_path / "g.jsonl"))
    assert params_from_dict(over.to_dict()) == over  # absolute paths round-trip
    with pytest.raises(ParamsError, match=r"data.sources.gsm8k: gsm8k split 'train': .*a.jsonl lacks column"):
        load_params(SMOKE, {"data.sources.gsm8k": {"train": "a.jsonl", "test": "g.jsonl"}})
    raw = {"data": {"sources": {"alpaca": "a.jsonl"}}}
    assert params_from_dict(raw).data.sources.alpaca == str(tmp_path / "a.jsonl")
    assert raw == {"data": {"sources": {"alpaca": "a.jsonl"}}}  # not modified in place


# --------------------------------------------------------------------------------------------- lazy, keyed by content
def test_a_source_loads_only_when_a_stage_reads_it(tmp_path, monkeypatch) -> None:
    from nlsr_lib.stages.evaluate import task_eval_rows
    from nlsr_lib.stages.world import load_source, load_sources

    rows = "sentence\tlabel\na fine film\t1\na dull film\t0\n"
    write(tmp_path / "sst2.tsv", rows)
    params = load_params(params_file(tmp_path / "p.yaml", {"sst2": {"train": "sst2.tsv", "validation": "sst2.tsv"},
                                                           "alpaca": "no-such-org/no-such-dataset"}))
    asked: list = []

    def hub(*args, **kwargs):
        asked.append(args)
        raise RuntimeError(f"hub asked for {args}")

    monkeypatch.setattr(datasets, "load_dataset", hub)
    run = Run(params.profile, root=tmp_path / "runs")
    sources = load_sources(params, run)
    assert list(sources) == list(SPLITS) and "alpaca" in sources and "mnli" not in sources and asked == []
    assert [r["sentence"] for r in task_eval_rows(params, run, "sst2")] == ["a fine film", "a dull film"]
    assert load_source(params, run, "sst2") is sources["sst2"]  # memoized per source
    assert asked == [] and not list((tmp_path / "runs").glob("world*"))  # no world built, no hub asked
    with pytest.raises(RuntimeError, match="hub asked for"):  # the bogus hub id is only a problem when read
        sources["alpaca"]
    assert asked == [("no-such-org/no-such-dataset",)]


def test_a_local_mapping_is_keyed_by_the_content_of_its_files(tmp_path) -> None:
    from nlsr_lib.stages.world import source_inputs

    rows = "sentence\tlabel\na fine film\t1\na dull film\t0\n"
    for name in ("a", "b"):
        write(tmp_path / name / "train.tsv", rows)
        write(tmp_path / name / "val.tsv.gz", rows)

    def value(folder: str) -> dict:
        sources = {"sst2": {"validation": f"{folder}/val.tsv.gz", "train": f"{folder}/train.tsv"}}
        params = load_params(params_file(tmp_path / "p.yaml", sources))
        inputs, values = source_inputs(params, Run(params.profile, root=tmp_path / "runs"), "sst2")
        assert inputs == {}  # no synthetic source: the world is not an input
        return values["sst2"]

    a = value("a")
    assert list(a) == ["train", "validation"] and a["train"].startswith("sha256:")
    assert a["validation"].endswith("#.tsv.gz")  # a compressed file names its format
    assert value("b") == a  # same content at other paths
    write(tmp_path / "b" / "val.tsv.gz", rows + "another film\t1\n")
    assert value("b")["validation"] != a["validation"] and value("b")["train"] == a["train"]


def test_the_synthetic_world_is_loaded_once_for_all_synthetic_sources(tmp_path, monkeypatch) -> None:
    from nlsr_lib.stages import world

    params = load_params(SMOKE)
    run = Run(params.profile, root=tmp_path / "runs")
    fake = {key: DatasetDict({"train": to_hub_schema("alpaca", ALPACA_ROWS)}) for key in world.WORLD_KEYS.values()}
    calls: list = []
    monkeypatch.setattr(world, "world_stage", lambda p, r: calls.append("world") or type("A", (), {"path": "w"})())
    monkeypatch.setattr("nlsr_lib.tiny.world.load_world", lambda path: calls.append(path) or fake)
    assert world.load_source(params, run, "alpaca") is fake[ALPACA]
    assert world.load_source(params, run, "gsm8k") is fake["gsm8k"]
    assert calls == ["world", "w"]
    with pytest.raises(ValueError, match="unknown source 'mnli'; allowed: beavertails, pku_saferlhf"):
        world.load_source(params, run, "mnli")


def test_beavertails_splits_from_two_files(tmp_path) -> None:
    row = {"prompt": "p", "response": "r", "category": {c: False for c in HARM_CATEGORIES}, "is_safe": True}
    write(tmp_path / "bt.jsonl", jsonl([row]))
    shutil.copy(tmp_path / "bt.jsonl", tmp_path / "bt2.jsonl")
    loaded = load_dataset_source("beavertails", {"30k_train": str(tmp_path / "bt.jsonl"),
                                                 "30k_test": str(tmp_path / "bt2.jsonl")})
    assert loaded["30k_test"][0] == row
