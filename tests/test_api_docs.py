"""The API reference page is rendered from the .proto files, so it cannot drift from them."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

from smartbin.v1 import classifier_pb2

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def api_docs() -> ModuleType:
    spec = importlib.util.spec_from_file_location("api_docs", ROOT / "proto" / "api_docs.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_page_covers_every_rpc_message_and_field_of_the_contract(api_docs: ModuleType) -> None:
    page = api_docs.render()
    missing = []
    for service in classifier_pb2.DESCRIPTOR.services_by_name.values():
        missing += [m.name for m in service.methods if f"### {m.name} " not in page]
    for message in classifier_pb2.DESCRIPTOR.message_types_by_name.values():
        if f"### {message.name} " not in page:
            missing.append(message.name)
        missing += [
            f"{message.name}.{f.name}"
            for f in message.fields
            if f"| `{f.name}` | {f.number} |" not in page
        ]
    assert not missing


def test_page_carries_the_comments_of_the_proto(api_docs: ModuleType) -> None:
    page = api_docs.render()
    assert "FAILED_PRECONDITION: the bundle is missing, corrupt, unsigned or wrongly signed" in page
    assert "| `top_k` | 2 | `uint32` | How many ranked labels to return;" in page
    assert "| `metrics` | 7 | `map<string, double>` |" in page
    assert "rpc WatchEvents(WatchEventsRequest) returns (stream ClassificationEvent)" in page


SAMPLE_PROTO = """\
// The sample API.
syntax = "proto3";

package sample.v2;

// Sorts things.
service Sorter {
  // Sorts a stream of items, answering as it goes.
  rpc Sort(stream Item) returns (stream Bin);
}

// One thing to sort.
message Item {
  // What it is | what it is made of.
  string name = 1;
  optional uint32 weight_grams = 2;
  map<string, Bin> history = 3;
  Material material = 4;
  // Where it was found.
  message Origin {
    string site = 1;
  }
  Origin origin = 5;
}

message Bin {
  repeated string labels = 1;
}

// What an item is made of.
enum Material {
  MATERIAL_UNSPECIFIED = 0;
  // Cans and foil.
  MATERIAL_METAL = 1;
}
"""


def test_streams_maps_optionals_nested_types_and_enums_render(
    api_docs: ModuleType, tmp_path: Path
) -> None:
    (tmp_path / "sample" / "v2").mkdir(parents=True)
    (tmp_path / "sample" / "v2" / "sample.proto").write_text(SAMPLE_PROTO)
    page = api_docs.render(tmp_path)
    assert "rpc Sort(stream Item) returns (stream Bin)" in page
    assert "Sorts a stream of items, answering as it goes." in page
    assert "| `name` | 1 | `string` | What it is \\| what it is made of. |" in page
    assert "| `weight_grams` | 2 | optional `uint32` |" in page
    assert "| `history` | 3 | `map<string, Bin>` |" in page
    assert "| `material` | 4 | [`Material`](#sample-v2-material) |" in page
    assert "### Item.Origin {#sample-v2-item-origin}" in page
    assert "| `origin` | 5 | [`Item.Origin`](#sample-v2-item-origin) |" in page
    assert "| `labels` | 1 | repeated `string` |" in page
    assert "HistoryEntry" not in page
    assert "## Enums" in page
    assert "| `MATERIAL_METAL` | 1 | Cans and foil. |" in page


def test_a_broken_proto_fails_the_build(api_docs: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "broken.proto").write_text('syntax = "proto3";\nmessage Item { string = 1; }\n')
    with pytest.raises(RuntimeError, match="protoc could not compile"):
        api_docs.render(tmp_path)
