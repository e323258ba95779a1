"""The report as a document: sections of paragraphs, sub-headings, tables and pictures, rendered as
Markdown (pictures as files beside it, or inlined as data URIs for a Prefect artifact) and as one
self-contained HTML page (pictures embedded as base64 PNG data URIs, inline CSS, no scripts)."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from PIL import Image

NOT_RUN = "not run"
"""What a cell or a paragraph says for a task, metric or figure that the run did not produce."""


@dataclass
class Table:
    """``keys``: how many leading columns name a row; a table split into narrower ones
    (``narrow_tables``) repeats them in each part."""

    headers: list[str]
    rows: list[list[str]]
    keys: int = 1


@dataclass
class Picture:
    """A PNG picture; ``name`` is its file name beside the Markdown."""

    png: bytes
    name: str
    alt: str

    @classmethod
    def from_image(cls, image: Image.Image, name: str, alt: str) -> "Picture":
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=True)
        return cls(buffer.getvalue(), name, alt)

    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")

    def preview(self, max_width: int) -> "Picture":
        """A lighter copy: at most ``max_width`` pixels wide, in 256 colours (plenty for charts,
        enough to read a heat map)."""
        with Image.open(io.BytesIO(self.png)) as source:
            image = source.convert("RGB")
        if image.width > max_width:
            image = image.resize((max_width, round(image.height * max_width / image.width)),
                                 Image.LANCZOS)
        return Picture.from_image(image.quantize(256), self.name, self.alt)


@dataclass
class Heading:
    """A heading one level below its section's."""

    text: str


Block = str | Table | Picture | Heading  # a str is a paragraph


@dataclass
class Section:
    title: str
    blocks: list[Block]
    level: int = 2


def pictures(sections: Sequence[Section]) -> list[Picture]:
    """Every picture of the document, in order."""
    return [block for section in sections for block in section.blocks if isinstance(block, Picture)]


def table_width(table: Table) -> int:
    """A table's width in characters when no cell wraps: per column its longest cell (or
    header) and 3 characters of padding. Prefect's Markdown artifacts render tables that way."""
    return sum(max(len(cell) for cell in column) + 3 for column in zip(table.headers, *table.rows))


def _split_table(table: Table, max_width: int) -> list[Table]:
    """The table as the fewest narrower tables of at most ``max_width`` (``table_width``), each
    with the key columns and an even share of the other columns, in order; one other column each
    where nothing narrower fits."""
    values = list(range(table.keys, len(table.headers)))
    if table_width(table) <= max_width or len(values) < 2:
        return [table]

    def part(columns: list[int]) -> Table:
        keep = [*range(table.keys), *columns]
        return Table([table.headers[i] for i in keep], [[row[i] for i in keep] for row in table.rows],
                     table.keys)

    for count in range(2, len(values) + 1):
        size, extra = divmod(len(values), count)
        bounds = [i * size + min(i, extra) for i in range(count + 1)]
        parts = [part(values[start:end]) for start, end in zip(bounds, bounds[1:])]
        if all(table_width(t) <= max_width for t in parts):
            break
    return parts


def narrow_tables(sections: Sequence[Section], max_width: int) -> list[Section]:
    """The sections with every table wider than ``max_width`` characters (``table_width``) split
    into narrower ones."""
    out = []
    for section in sections:
        blocks: list[Block] = []
        for block in section.blocks:
            blocks += _split_table(block, max_width) if isinstance(block, Table) else [block]
        out.append(replace(section, blocks=blocks))
    return out


def _markdown_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _markdown_alt(text: str) -> str:
    return text.replace("[", "(").replace("]", ")").replace("\n", " ")


def render_markdown(sections: Sequence[Section], picture_source: Callable[[Picture], str]) -> str:
    """Markdown showing each picture from ``picture_source(picture)``: a path relative to the
    Markdown file, or a data URI (``Picture.data_uri``)."""
    out: list[str] = []
    for section in sections:
        out += ["#" * section.level + " " + section.title, ""]
        for block in section.blocks:
            if isinstance(block, Table):
                out.append("| " + " | ".join(_markdown_cell(h) for h in block.headers) + " |")
                out.append("|" + "---|" * len(block.headers))
                out += ["| " + " | ".join(_markdown_cell(c) for c in row) + " |" for row in block.rows]
            elif isinstance(block, Picture):
                out.append(f"![{_markdown_alt(block.alt)}]({picture_source(block)})")
            elif isinstance(block, Heading):
                out.append("#" * (section.level + 1) + " " + block.text)
            else:
                out.append(block)
            out.append("")
    return "\n".join(out)


_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto;
       max-width: 1150px; color: #222; line-height: 1.45; padding: 0 1em; }
h1 { font-size: 1.6em; border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { font-size: 1.25em; margin-top: 1.8em; border-bottom: 1px solid #bbb; }
h3 { font-size: 1.02em; margin: 1.2em 0 .3em; }
table { border-collapse: collapse; margin: .6em 0 1.2em; font-size: .85em; }
th, td { border: 1px solid #ccc; padding: .25em .55em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
tr:nth-child(even) td { background: #fafafa; }
td.not-run { color: #a33; font-style: italic; }
img { max-width: 100%; display: block; margin: .4em 0 1em; }
"""


def render_html(sections: Sequence[Section], title: str) -> str:
    """One HTML page that needs nothing else: no links, no scripts, pictures inline."""
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"]
    for section in sections:
        level = section.level
        parts.append(f"<h{level}>{html.escape(section.title)}</h{level}>")
        for block in section.blocks:
            if isinstance(block, Table):
                parts.append("<table><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in block.headers)
                             + "</tr></thead><tbody>")
                for row in block.rows:
                    cells = "".join(
                        f'<td class="not-run">{html.escape(c)}</td>' if c == NOT_RUN
                        else f"<td>{html.escape(c)}</td>" for c in row)
                    parts.append(f"<tr>{cells}</tr>")
                parts.append("</tbody></table>")
            elif isinstance(block, Picture):
                parts.append(f'<img alt="{html.escape(block.alt)}" src="{block.data_uri()}">')
            elif isinstance(block, Heading):
                parts.append(f"<h{level + 1}>{html.escape(block.text)}</h{level + 1}>")
            else:
                parts.append(f"<p>{html.escape(block)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
