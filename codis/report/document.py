"""The report as a document: sections of paragraphs, sub-headings, tables and pictures, rendered as
Markdown (pictures as files beside it) and as one self-contained HTML page (pictures embedded as
base64 PNG data URIs, inline CSS, no scripts)."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

NOT_RUN = "not run"
"""What a cell or a paragraph says for a task, metric or figure that the run did not produce."""


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


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


def _markdown_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(sections: Sequence[Section], files_dir: str) -> str:
    """Markdown linking each picture as ``files_dir/<name>``."""
    out: list[str] = []
    for section in sections:
        out += ["#" * section.level + " " + section.title, ""]
        for block in section.blocks:
            if isinstance(block, Table):
                out.append("| " + " | ".join(_markdown_cell(h) for h in block.headers) + " |")
                out.append("|" + "---|" * len(block.headers))
                out += ["| " + " | ".join(_markdown_cell(c) for c in row) + " |" for row in block.rows]
            elif isinstance(block, Picture):
                out.append(f"![{block.alt}]({files_dir}/{block.name})")
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
                data = base64.b64encode(block.png).decode("ascii")
                parts.append(f'<img alt="{html.escape(block.alt)}" src="data:image/png;base64,{data}">')
            elif isinstance(block, Heading):
                parts.append(f"<h{level + 1}>{html.escape(block.text)}</h{level + 1}>")
            else:
                parts.append(f"<p>{html.escape(block)}</p>")
    parts.append("</body></html>")
    return "\n".join(parts)
