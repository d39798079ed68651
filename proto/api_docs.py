"""Render the gRPC API reference page from the .proto files, comments included.

mkdocs runs this file as a hook (``hooks:`` in mkdocs.yml) and adds the page as ``api.md`` when
the site is built, so the reference is the contract itself and cannot drift from it. There is no
committed copy: edit the comments in the .proto. ``python proto/api_docs.py`` prints the page.
"""

from __future__ import annotations

import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2
from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
PAGE = "api.md"

# Paths into a FileDescriptorProto, as protoc's SourceCodeInfo numbers them.
SYNTAX, MESSAGE, ENUM, SERVICE = 12, 4, 5, 6
FIELD, NESTED_MESSAGE, NESTED_ENUM, METHOD, ENUM_VALUE = 2, 3, 4, 2, 2

Field = descriptor_pb2.FieldDescriptorProto


def load_descriptors(root: Path = PROTO_ROOT) -> list[descriptor_pb2.FileDescriptorProto]:
    """Compile every .proto under ``root`` with its comments kept (--include_source_info)."""
    protos = sorted(str(p.relative_to(root)) for p in root.rglob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "descriptors.pb"
        args = [
            "protoc",
            f"-I{root}",
            "--include_source_info",
            f"--descriptor_set_out={out}",
            *protos,
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc could not compile {protos}")
        descriptor_set = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    return list(descriptor_set.file)


class Comments:
    """The comments protoc attached to each element of one file, looked up by element path."""

    def __init__(self, proto: descriptor_pb2.FileDescriptorProto) -> None:
        self._by_path: dict[tuple[int, ...], str] = {}
        for location in proto.source_code_info.location:
            parts = [location.leading_comments, location.trailing_comments]
            text = "\n".join(textwrap.dedent(p).strip() for p in parts if p.strip())
            if text:
                self._by_path[tuple(location.path)] = text

    def block(self, *path: int) -> str:
        """The comment as paragraphs, followed by a blank line; empty when there is none."""
        text = self._by_path.get(path, "")
        return f"{text}\n\n" if text else ""

    def cell(self, *path: int) -> str:
        """The comment on one line, safe inside a Markdown table cell."""
        return " ".join(self._by_path.get(path, "").split()).replace("|", "\\|")


def anchor(full_name: str) -> str:
    return full_name.lower().replace(".", "-")


def short_name(type_name: str, package: str) -> str:
    """``.smartbin.v1.Prediction`` -> ``Prediction``."""
    return type_name.lstrip(".").removeprefix(f"{package}.")


def type_link(type_name: str, package: str) -> str:
    """A link to the section of a message or enum, named without the package."""
    return f"[`{short_name(type_name, package)}`](#{anchor(type_name.lstrip('.'))})"


def plain_type(field: Field, package: str) -> str:
    if field.type in (Field.TYPE_MESSAGE, Field.TYPE_ENUM):
        return short_name(field.type_name, package)
    return Field.Type.Name(field.type).removeprefix("TYPE_").lower()


def field_type(
    field: Field, package: str, map_entries: dict[str, descriptor_pb2.DescriptorProto]
) -> str:
    entry = map_entries.get(field.type_name.lstrip("."))
    if entry is not None:
        key, value = (plain_type(f, package) for f in entry.field)
        return f"`map<{key}, {value}>`"
    if field.type in (Field.TYPE_MESSAGE, Field.TYPE_ENUM):
        name = type_link(field.type_name, package)
    else:
        name = f"`{plain_type(field, package)}`"
    if field.label == Field.LABEL_REPEATED:
        return f"repeated {name}"
    if field.proto3_optional:
        return f"optional {name}"
    return name


def walk_messages(
    messages: Any, prefix: str, path: tuple[int, ...]
) -> Iterator[tuple[str, descriptor_pb2.DescriptorProto, tuple[int, ...]]]:
    """Every message, nested ones included, as (full name, descriptor, comment path)."""
    for index, message in enumerate(messages):
        full_name = f"{prefix}.{message.name}"
        message_path = (*path, index)
        yield full_name, message, message_path
        yield from walk_messages(message.nested_type, full_name, (*message_path, NESTED_MESSAGE))


def render_service(
    service: descriptor_pb2.ServiceDescriptorProto, index: int, package: str, notes: Comments
) -> list[str]:
    full_name = f"{package}.{service.name}"
    out = [f"## Service `{service.name}` {{#{anchor(full_name)}}}\n\n", notes.block(SERVICE, index)]
    for number, method in enumerate(service.method):
        request = short_name(method.input_type, package)
        reply = short_name(method.output_type, package)
        request = f"stream {request}" if method.client_streaming else request
        reply = f"stream {reply}" if method.server_streaming else reply
        out += [
            f"### {method.name} {{#{anchor(full_name + '.' + method.name)}}}\n\n",
            f"```proto\nrpc {method.name}({request}) returns ({reply})\n```\n\n",
            f"Takes {type_link(method.input_type, package)}, "
            f"returns {'a stream of ' if method.server_streaming else ''}"
            f"{type_link(method.output_type, package)}.\n\n",
            notes.block(SERVICE, index, METHOD, number),
        ]
    return out


def render_message(
    full_name: str,
    message: descriptor_pb2.DescriptorProto,
    path: tuple[int, ...],
    package: str,
    notes: Comments,
    map_entries: dict[str, descriptor_pb2.DescriptorProto],
) -> list[str]:
    title = full_name.removeprefix(f"{package}.")
    out = [f"### {title} {{#{anchor(full_name)}}}\n\n", notes.block(*path)]
    if not message.field:
        return [*out, "No fields.\n\n"]
    out.append("| Field | Number | Type | Description |\n|---|---|---|---|\n")
    for index, field in enumerate(message.field):
        kind = field_type(field, package, map_entries)
        description = notes.cell(*path, FIELD, index)
        out.append(f"| `{field.name}` | {field.number} | {kind} | {description} |\n")
    return [*out, "\n"]


def render_enum(
    full_name: str,
    enum: descriptor_pb2.EnumDescriptorProto,
    path: tuple[int, ...],
    package: str,
    notes: Comments,
) -> list[str]:
    title = full_name.removeprefix(f"{package}.")
    out = [f"### {title} {{#{anchor(full_name)}}}\n\n", notes.block(*path)]
    out.append("| Name | Number | Description |\n|---|---|---|\n")
    for index, value in enumerate(enum.value):
        out.append(
            f"| `{value.name}` | {value.number} | {notes.cell(*path, ENUM_VALUE, index)} |\n"
        )
    return [*out, "\n"]


def render_file(proto: descriptor_pb2.FileDescriptorProto) -> list[str]:
    package, notes = proto.package, Comments(proto)
    messages = list(walk_messages(proto.message_type, package, (MESSAGE,)))
    map_entries = {name: m for name, m, _ in messages if m.options.map_entry}
    out = [f"`{proto.name}`, package `{package}`\n\n", notes.block(SYNTAX)]
    for index, service in enumerate(proto.service):
        out += render_service(service, index, package, notes)
    out.append("## Messages\n\n")
    for full_name, message, path in messages:
        if not message.options.map_entry:
            out += render_message(full_name, message, path, package, notes, map_entries)
    enums = [(f"{package}.{e.name}", e, (ENUM, i)) for i, e in enumerate(proto.enum_type)]
    for full_name, message, path in messages:
        enums += [
            (f"{full_name}.{e.name}", e, (*path, NESTED_ENUM, i))
            for i, e in enumerate(message.enum_type)
        ]
    if enums:
        out.append("## Enums\n\n")
        for full_name, enum, path in enums:
            out += render_enum(full_name, enum, path, package, notes)
    return out


def render(root: Path = PROTO_ROOT) -> str:
    """The API reference page for every .proto under ``root``, as Markdown."""
    out = [
        "# gRPC API\n\n",
        '!!! note "Generated from the contract"\n'
        "    This page is rendered from the `.proto` files under `proto/` each time the docs "
        "are built.\n    To change it, edit the comments there.\n\n",
    ]
    for proto in load_descriptors(root):
        out += render_file(proto)
    return "".join(out).rstrip() + "\n"


def on_files(files: Any, config: Any) -> Any:
    """mkdocs hook: add the rendered page to the site's files."""
    from mkdocs.structure.files import File

    files.append(File.generated(config, PAGE, content=render()))
    return files


def on_serve(server: Any, config: Any, builder: Any) -> Any:
    """mkdocs hook: ``mkdocs serve`` rebuilds when a .proto changes."""
    server.watch(str(PROTO_ROOT))
    return server


if __name__ == "__main__":
    print(render(), end="")
