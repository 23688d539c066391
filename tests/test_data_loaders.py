"""Real-data loaders: hub calls (mocked, no network), local files mapped to the hub schema, real copies. The source
forms themselves (single file, mapping, gz, params resolution) are tested in test_sources.py."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from datasets import Dataset, DatasetDict

from nlsr_lib.data import loaders
from nlsr_lib.data.builders import build_kto, build_preference_pairs
from nlsr_lib.data.loaders import EXPECTED_COLUMNS, SPLITS, load_dataset_source, to_hub_schema, validate_columns
from nlsr_lib.data.tasks import get_task
from nlsr_lib.data.schemas import HARM_CATEGORIES, SCHEMAS

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"real data copies absent ({SHARED_DATA})")


# ------------------------------------------------------------------------------------------- hub ids (mocked)
@pytest.fixture
def fake_hub(monkeypatch):
    calls: list[tuple[tuple, dict]] = []

    def fake_load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        name = {"gsm8k": "gsm8k", "PKU-Alignment/BeaverTails": "beavertails", "sst2": "sst2"}.get(args[0], "alpaca")
        return Dataset.from_dict({c: [] for c in EXPECTED_COLUMNS[name]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    return calls


def load_one(name: str, path: Path | str) -> Dataset:
    """One local file as every split ``name`` needs (a mapping naming the same file), returning the first split."""
    loaded = load_dataset_source(name, dict.fromkeys(SPLITS[name], str(path)))
    assert isinstance(loaded, DatasetDict) and list(loaded) == list(SPLITS[name])
    return loaded[SPLITS[name][0]]


def test_hub_ids_load_the_needed_splits_one_call_each(fake_hub) -> None:
    gsm8k = load_dataset_source("gsm8k", "gsm8k")
    beaver = load_dataset_source("beavertails", "PKU-Alignment/BeaverTails")
    assert fake_hub == [
        (("gsm8k", "main"), {"split": "train"}),
        (("gsm8k", "main"), {"split": "test"}),
        (("PKU-Alignment/BeaverTails",), {"split": "30k_train"}),
        (("PKU-Alignment/BeaverTails",), {"split": "30k_test"}),
    ]
    assert isinstance(gsm8k, DatasetDict) and list(gsm8k) == ["train", "test"]
    assert list(beaver) == ["30k_train", "30k_test"]


def test_hub_result_is_validated(fake_hub) -> None:
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['prompt', 'response', 'category', 'is_safe'\]"):
        load_dataset_source("beavertails", "someone/alpaca-like")


def test_unknown_name_lists_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match="beavertails, pku_saferlhf, sst2, ag_news, gsm8k, alpaca"):
        load_dataset_source("mnli", "glue")


def test_missing_local_path_is_not_sent_to_the_hub(fake_hub, tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_dataset_source("sst2", str(tmp_path / "absent.tsv"))
    (tmp_path / "train.tsv").write_text("sentence\tlabel\nfine\t1\n")
    with pytest.raises(FileNotFoundError, match="split 'validation': file .* does not exist"):
        load_dataset_source("sst2", {"train": str(tmp_path / "train.tsv"), "validation": str(tmp_path / "absent.tsv")})
    assert fake_hub == []


# ------------------------------------------------------------------------------------------- local files
def test_sst2_tsv_with_header_gains_idx(tmp_path) -> None:
    f = tmp_path / "dev.tsv"
    f.write_text('sentence\tlabel\nit \'s a "charming" journey . \t1\nbleak and dull \t0\n', encoding="utf-8")
    ds = load_one("sst2", f)
    assert ds.column_names == ["idx", "sentence", "label"] and ds.features == SCHEMAS["sst2"]
    assert ds.to_list() == [
        {"idx": 0, "sentence": 'it \'s a "charming" journey . ', "label": 1},
        {"idx": 1, "sentence": "bleak and dull ", "label": 0},
    ]


def test_ag_news_tsv_without_header_maps_string_labels(tmp_path) -> None:
    f = tmp_path / "test.tsv"
    f.write_text("Stocks 'rise' \\ again.\tBusiness\nA rocket flew.\tSci/Tech\nTalks.\tWorld\nGoal!\tSports\n")
    ds = load_one("ag_news", str(f))
    assert ds["label"][:] == [2, 3, 0, 1] and ds[0]["text"] == "Stocks 'rise' \\ again."
    assert ds.features == SCHEMAS["ag_news"]
    f.write_text("A headline.\tPolitics\n")
    with pytest.raises(ValueError, match=r"label 'Politics' is not allowed; allowed: \[0, 1, 2, 3\]"):
        load_one("ag_news", f)


def test_gsm8k_jsonl_as_is(tmp_path) -> None:
    f = tmp_path / "test.jsonl"
    rows = [{"question": "1+1?", "answer": "1+1=2\n#### 2"}, {"question": "2*3?", "answer": "#### 6"}]
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = load_one("gsm8k", f)
    assert ds.to_list() == rows
    assert get_task("gsm8k").to_record(ds[0])["output"] == "1+1=2\nThe final answer is:  2"


def test_ranking_file_becomes_saferlhf_rows(tmp_path) -> None:
    f = tmp_path / "dpo.json"
    f.write_text(json.dumps([{"prompt": "p", "response": ["no thanks", "sure, step 1"]}]))
    ds = load_one("pku_saferlhf", f)
    assert ds.features == SCHEMAS["PKU-Alignment/PKU-SafeRLHF-30K"]
    assert ds[0] == {
        "prompt": "p", "response_0": "no thanks", "response_1": "sure, step 1", "is_response_0_safe": True,
        "is_response_1_safe": False, "better_response_id": 0, "safer_response_id": 0,
    }  # fmt: skip
    f.write_text(json.dumps([{"prompt": "p", "response": ["only one"]}]))
    with pytest.raises(ValueError, match=r"\[chosen, rejected\]"):
        load_one("pku_saferlhf", f)


def test_beavertails_json_and_parquet(tmp_path) -> None:
    row = {"prompt": "p", "response": "r", "category": {c: c == "self_harm" for c in HARM_CATEGORIES}, "is_safe": False}
    (tmp_path / "bt.json").write_text(json.dumps([row]))
    ds = load_one("beavertails", tmp_path / "bt.json")
    assert ds.features == SCHEMAS["PKU-Alignment/BeaverTails"] and ds[0] == row
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "bt.parquet")
    assert load_one("beavertails", tmp_path / "bt.parquet")[0] == row


def test_alpaca_csv_keeps_extra_columns(tmp_path) -> None:
    f = tmp_path / "alpaca.csv"
    f.write_text('instruction,input,output,source\n"Say hi, politely.",,Hi.,mine\n')
    ds = load_dataset_source("alpaca", f)["train"]  # one file: the one split
    assert ds.column_names == ["instruction", "input", "output", "source"]
    assert ds[0] == {"instruction": "Say hi, politely.", "input": "", "output": "Hi.", "source": "mine"}


def test_unknown_extension_and_missing_columns(tmp_path) -> None:
    (tmp_path / "x.txt").write_text("hello")
    allowed = r"allowed: \.json, \.jsonl, \.csv, \.tsv, \.parquet \(each optionally \.gz\)"
    with pytest.raises(ValueError, match=r"'\.txt' is not supported; " + allowed):
        load_dataset_source("alpaca", tmp_path / "x.txt")
    (tmp_path / "q.jsonl").write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(ValueError, match=r"gsm8k data lacks column\(s\) \['answer'\]"):
        load_one("gsm8k", tmp_path / "q.jsonl")
    (tmp_path / "d.json").write_text(json.dumps({"question": "q"}))
    with pytest.raises(ValueError, match="list of records"):
        load_one("gsm8k", tmp_path / "d.json")


def test_save_to_disk_directories(tmp_path) -> None:
    ds = to_hub_schema("gsm8k", [{"question": "q", "answer": "#### 1"}])
    DatasetDict({"train": ds, "test": ds, "extra": ds}).save_to_disk(str(tmp_path / "dd"))
    ds.save_to_disk(str(tmp_path / "single"))
    loaded = load_dataset_source("gsm8k", tmp_path / "dd")
    assert isinstance(loaded, DatasetDict) and list(loaded) == ["train", "test"]  # the splits gsm8k needs
    assert loaded["test"][0]["answer"] == "#### 1"
    with pytest.raises(ValueError, match=r"has no split\(s\) \['validation'\]; sst2 needs train, validation; "
                                         r"available: train, test, extra"):
        load_dataset_source("sst2", tmp_path / "dd")
    with pytest.raises(ValueError, match=r"gsm8k needs the splits train, test, but .*single holds one Dataset"):
        load_dataset_source("gsm8k", tmp_path / "single")
    alpaca = to_hub_schema("alpaca", [{"instruction": "i", "output": "o"}])
    alpaca.save_to_disk(str(tmp_path / "alpaca"))
    assert load_dataset_source("alpaca", tmp_path / "alpaca")["train"][0]["input"] == ""


def test_validate_columns_rejects_other_types() -> None:
    with pytest.raises(ValueError, match="expected a datasets.Dataset"):
        validate_columns("gsm8k", [{"question": "q"}])  # type: ignore[arg-type]
    assert loaders.HUB_CONFIGS == {"gsm8k": "main", "alpaca_eval": "alpaca_eval"}


# ------------------------------------------------------------------------------------------- real copies
def _head(src: Path, dst: Path, n: int) -> Path:
    with src.open(encoding="utf-8") as fh:
        dst.write_text("".join(islice(fh, n)), encoding="utf-8")
    return dst


@needs_shared
def test_real_sst2_slice(tmp_path) -> None:
    ds = load_one("sst2", _head(SHARED_DATA / "sst2" / "test.tsv", tmp_path / "sst2.tsv", 21))
    assert len(ds) == 20 and set(ds["label"]) == {0, 1}
    rec = get_task("sst2").to_record(ds[0])
    assert rec["output"] == "positive" and rec["input"].startswith("it 's a charming")


@needs_shared
def test_real_ag_news_slice(tmp_path) -> None:
    ds = load_one("ag_news", _head(SHARED_DATA / "ag_news" / "test.tsv", tmp_path / "ag.tsv", 40))
    assert len(ds) == 40 and set(ds["label"]) <= {0, 1, 2, 3}
    assert get_task("ag_news").to_record(ds[0])["output"] == "Business"


@needs_shared
def test_real_gsm8k_slice(tmp_path) -> None:
    ds = load_one("gsm8k", _head(SHARED_DATA / "gsm8k" / "test.jsonl", tmp_path / "g.jsonl", 5))
    out = get_task("gsm8k").to_record(ds[0])["output"]
    assert out.endswith("The final answer is:  18") and "####" not in out


@needs_shared
def test_real_ranking_slice(tmp_path) -> None:
    records = json.loads((SHARED_DATA / "pku_saferlhf_dpo_5k" / "pku_seferlhf_realign_dpo_5k.json").read_text())
    (tmp_path / "r.json").write_text(json.dumps(records[:12]))
    ds = load_one("pku_saferlhf", tmp_path / "r.json")
    pairs = build_preference_pairs(ds, n=12)
    assert [p["chosen"] for p in pairs] == [r["response"][0] for r in records[:12]]
    kto = build_kto(ds, n_safe=6, n_unsafe=6)
    assert [r["label"] for r in kto] == [True] * 6 + [False] * 6


# ------------------------------------------------------------------------------------------- gzip-compressed files
@pytest.mark.parametrize("suffix", [".jsonl.gz", ".json.gz"])
def test_gzip_json_and_jsonl_files_are_read(tmp_path, suffix) -> None:
    """A ``.jsonl.gz`` / ``.json.gz`` file (as hh_rlhf_harmless_base ships: test.jsonl.gz) is read, not rejected."""
    import gzip

    rows = [{"prompt": "p", "response": ["no thanks", "sure, step 1"]}, {"prompt": "q", "response": ["no", "ok"]}]
    text = "".join(json.dumps(r) + "\n" for r in rows) if suffix == ".jsonl.gz" else json.dumps(rows)
    f = tmp_path / f"pairs{suffix}"
    f.write_bytes(gzip.compress(text.encode("utf-8")))
    assert loaders.file_format(f) == suffix.removesuffix(".gz") and loaders.source_form(str(f)) == "file"
    assert loaders.file_columns("pku_saferlhf", f) == ["prompt", "response"]
    loaders.check_local_source("pku_saferlhf", {"train": str(f), "test": str(f)})
    ds = load_one("pku_saferlhf", f)
    assert ds["prompt"] == ["p", "q"] and ds["response_0"] == ["no thanks", "no"]


@needs_shared
def test_real_hh_jsonl_gz_is_read() -> None:
    """The real hh-rlhf ``test.jsonl.gz``: its records are read (columns chosen, rejected); a dataset that needs
    other columns is refused for its columns, never for the file type."""
    hh = SHARED_DATA / "hh_rlhf_harmless_base" / "test.jsonl.gz"
    assert loaders.split_files("alpaca", hh) == {"train": hh}
    assert loaders.file_columns("alpaca", hh) == ["chosen", "rejected"]
    with pytest.raises(loaders.SourceError, match=r"lacks column\(s\) \['instruction', 'output'\]; "
                                                  r"found \['chosen', 'rejected'\]"):
        loaders.check_local_source("alpaca", hh)
    with pytest.raises(loaders.SourceError, match=r"alpaca data lacks column\(s\) \['instruction', 'output'\]"):
        load_dataset_source("alpaca", hh)  # every record parsed, then refused for its columns
