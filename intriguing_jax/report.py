"""A small report builder: Markdown and a self-contained HTML page (PNG figures embedded as base64).

Usage::

    from intriguing_jax import report
    rep = report.Report("Tables 1-4 on MNIST")
    rep.heading("Table 1")
    rep.paragraph("Our numbers beside the paper's.")
    rep.table(rows, columns=["model", "test error", "paper"], floatfmt=".3g", caption="Table 1")
    rep.image("figures/fig7.png", caption="Figure 7 analogue")     # path relative to the output dir
    md_path, html_path = rep.write(workdir, "report")              # report.md + report.html, atomically
"""

from __future__ import annotations

import base64
import html
import os
from typing import Any, List, Mapping, Optional, Sequence, Tuple

from intriguing_jax import checkpoint
from intriguing_jax import plotting


def _md_image(relpath: str, caption: Optional[str], base_dir: str) -> str:
  del base_dir
  return f"![{caption or ''}]({relpath})\n" + (f"\n*{caption}*\n" if caption else "")


def _html_image(relpath: str, caption: Optional[str], base_dir: str) -> str:
  """An <img>; a PNG that exists under ``base_dir`` is embedded as base64."""
  full, src = os.path.join(base_dir, relpath), html.escape(relpath)
  if os.path.isfile(full):
    with open(full, "rb") as f:
      src = "data:image/png;base64," + base64.b64encode(f.read()).decode("ascii")
  cap = f"<figcaption>{html.escape(caption)}</figcaption>" if caption else ""
  return f"<figure><img src='{src}' alt='{html.escape(caption or relpath)}'>{cap}</figure>"


def _html_table(rows, columns, floatfmt, caption) -> str:
  esc = html.escape
  head = "".join(f"<th>{esc(str(c))}</th>" for c in columns)
  cells = lambda r: "".join(f"<td>{esc(plotting.format_cell(r.get(c), floatfmt))}</td>" for c in columns)
  body = "".join(f"<tr>{cells(r)}</tr>" for r in rows)
  cap = f"<caption>{esc(caption)}</caption>" if caption else ""
  return f"<table>{cap}<tr>{head}</tr>{body}</table>"


# Block kind -> renderer of its value (a tuple), for each format; images also get the output directory.
_MARKDOWN = {
    "heading": lambda level, text: "#" * level + " " + text + "\n",
    "paragraph": lambda text: text.strip() + "\n",
    "bullets": lambda items: "\n".join(f"- {item}" for item in items) + "\n",
    "code": lambda text: "```\n" + text.rstrip() + "\n```\n",
    "table": lambda rows, columns, floatfmt, caption: (f"*{caption}*\n\n" if caption else "")
             + plotting.markdown_table(rows, columns, floatfmt=floatfmt),
    "image": _md_image,
}
_HTML = {
    "heading": lambda level, text: f"<h{level}>{html.escape(text)}</h{level}>",
    "paragraph": lambda text: f"<p>{html.escape(text.strip())}</p>",
    "bullets": lambda items: "<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in items) + "</ul>",
    "code": lambda text: f"<pre>{html.escape(text)}</pre>",
    "table": _html_table,
    "image": _html_image,
}
_STYLE = ("<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
          "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:3px 8px;"
          "text-align:right}th{background:#eee}td:first-child{text-align:left}img{max-width:100%}"
          "pre{background:#f6f6f6;padding:.6em;overflow-x:auto}figcaption{font-style:italic}</style>")


class Report:
  """Ordered blocks (heading, paragraph, bullets, code, table, image) rendered to Markdown and HTML."""

  def __init__(self, title: str):
    self.title = title
    self.blocks: List[Tuple[str, tuple]] = []

  def heading(self, text: str) -> None:
    self.blocks.append(("heading", (2, text)))

  def paragraph(self, text: str) -> None:
    self.blocks.append(("paragraph", (text,)))

  def bullets(self, items: Sequence[str]) -> None:
    self.blocks.append(("bullets", (list(items),)))

  def code(self, text: str) -> None:
    self.blocks.append(("code", (text,)))

  def table(self, rows: Sequence[Mapping[str, Any]], columns: Optional[Sequence[str]] = None, *,
            floatfmt: str = ".4g", caption: Optional[str] = None) -> None:
    self.blocks.append(("table", (list(rows), plotting.table_columns(rows, columns), floatfmt, caption)))

  def image(self, relpath: str, caption: Optional[str] = None) -> None:
    """Adds a PNG given by its path relative to the directory the report is written to."""
    self.blocks.append(("image", (relpath, caption)))

  def _render(self, renderers: Mapping[str, Any], base_dir: str) -> List[str]:
    return [renderers[kind](*value, base_dir) if kind == "image" else renderers[kind](*value)
            for kind, value in self.blocks]

  def to_markdown(self) -> str:
    return "\n".join([f"# {self.title}\n"] + self._render(_MARKDOWN, ""))

  def to_html(self, base_dir: str) -> str:
    """The page, with every PNG found under ``base_dir`` embedded."""
    head = (f"<!DOCTYPE html><html><head><meta charset='utf-8'>\n<title>{html.escape(self.title)}</title>\n"
            f"{_STYLE}\n</head><body><h1>{html.escape(self.title)}</h1>")
    return "\n".join([head] + self._render(_HTML, base_dir) + ["</body></html>"])

  def write(self, out_dir: str, name: str = "report") -> Tuple[str, str]:
    """Writes ``out_dir/name.md`` and ``name.html`` atomically; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    md_path, html_path = os.path.join(out_dir, name + ".md"), os.path.join(out_dir, name + ".html")
    checkpoint.atomic_write_bytes(md_path, self.to_markdown().encode("utf-8"))
    checkpoint.atomic_write_bytes(html_path, self.to_html(out_dir).encode("utf-8"))
    return md_path, html_path
