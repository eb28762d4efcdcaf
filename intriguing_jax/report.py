"""A small report builder: Markdown and a self-contained HTML page with embedded PNG figures.

Usage::

    from intriguing_jax import report
    rep = report.Report("Tables 1-4 on MNIST")
    rep.heading("Table 1")
    rep.paragraph("Our numbers beside the paper's.")
    rep.table(rows, columns=["model", "test error", "paper"], floatfmt=".3g", caption="Table 1")
    rep.image("figures/fig7.png", caption="Figure 7 analogue")     # path relative to the output dir
    md_path, html_path = rep.write(workdir, "report")              # report.md + report.html

The report is built from structured blocks, so both formats are rendered from the same content; the HTML
page embeds every PNG as base64 and can be opened or mailed on its own. Files are written atomically.
"""

from __future__ import annotations

import base64
import html
import os
from typing import Any, List, Mapping, Optional, Sequence, Tuple

from intriguing_jax import checkpoint
from intriguing_jax import plotting


class Report:
  """An ordered list of blocks (heading, paragraph, table, image, code) rendered to Markdown and HTML."""

  def __init__(self, title: str):
    self.title = title
    self.blocks: List[Tuple[str, Any]] = []

  def heading(self, text: str, level: int = 2) -> None:
    if not 1 <= level <= 6:
      raise ValueError(f"heading level must be in 1..6, got {level}")
    self.blocks.append(("heading", (level, text)))

  def paragraph(self, text: str) -> None:
    self.blocks.append(("paragraph", text))

  def bullets(self, items: Sequence[str]) -> None:
    self.blocks.append(("bullets", list(items)))

  def code(self, text: str) -> None:
    self.blocks.append(("code", text))

  def table(self, rows: Sequence[Mapping[str, Any]], columns: Optional[Sequence[str]] = None, *,
            floatfmt: str = ".4g", caption: Optional[str] = None) -> None:
    columns = plotting.table_columns(rows, columns)
    self.blocks.append(("table", (list(rows), columns, floatfmt, caption)))

  def image(self, relpath: str, caption: Optional[str] = None) -> None:
    """Adds a PNG given by its path relative to the directory the report is written to."""
    self.blocks.append(("image", (relpath, caption)))

  # -- rendering ---------------------------------------------------------------------------------

  def to_markdown(self) -> str:
    out = [f"# {self.title}\n"]
    for kind, value in self.blocks:
      if kind == "heading":
        level, text = value
        out.append("#" * level + " " + text + "\n")
      elif kind == "paragraph":
        out.append(value.strip() + "\n")
      elif kind == "bullets":
        out.append("\n".join(f"- {item}" for item in value) + "\n")
      elif kind == "code":
        out.append("```\n" + value.rstrip() + "\n```\n")
      elif kind == "table":
        rows, columns, floatfmt, caption = value
        if caption:
          out.append(f"*{caption}*\n")
        out.append(plotting.markdown_table(rows, columns, floatfmt=floatfmt))
      elif kind == "image":
        relpath, caption = value
        out.append(f"![{caption or ''}]({relpath})\n" + (f"\n*{caption}*\n" if caption else ""))
    return "\n".join(out)

  def to_html(self, base_dir: str) -> str:
    esc = html.escape
    parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'>",
             f"<title>{esc(self.title)}</title>",
             "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:3px 8px;"
             "text-align:right}th{background:#eee}td:first-child{text-align:left}img{max-width:100%}"
             "pre{background:#f6f6f6;padding:.6em;overflow-x:auto}figcaption{font-style:italic}</style>",
             f"</head><body><h1>{esc(self.title)}</h1>"]
    for kind, value in self.blocks:
      if kind == "heading":
        level, text = value
        parts.append(f"<h{level}>{esc(text)}</h{level}>")
      elif kind == "paragraph":
        parts.append(f"<p>{esc(value.strip())}</p>")
      elif kind == "bullets":
        parts.append("<ul>" + "".join(f"<li>{esc(i)}</li>" for i in value) + "</ul>")
      elif kind == "code":
        parts.append(f"<pre>{esc(value)}</pre>")
      elif kind == "table":
        rows, columns, floatfmt, caption = value
        cap = f"<caption>{esc(caption)}</caption>" if caption else ""
        head = "".join(f"<th>{esc(str(c))}</th>" for c in columns)
        body = "".join("<tr>" + "".join(f"<td>{esc(plotting._fmt(r.get(c), floatfmt))}</td>" for c in columns)
                       + "</tr>" for r in rows)
        parts.append(f"<table>{cap}<tr>{head}</tr>{body}</table>")
      elif kind == "image":
        relpath, caption = value
        full = os.path.join(base_dir, relpath)
        if os.path.isfile(full):
          with open(full, "rb") as f:
            data = base64.b64encode(f.read()).decode("ascii")
          src = f"data:image/png;base64,{data}"
        else:
          src = esc(relpath)
        cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
        parts.append(f"<figure><img src='{src}' alt='{esc(caption or relpath)}'>{cap}</figure>")
    parts.append("</body></html>")
    return "\n".join(parts)

  def write(self, out_dir: str, name: str = "report", *, html_page: bool = True) -> Tuple[str, Optional[str]]:
    """Writes ``out_dir/name.md`` (and ``name.html``); returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    md_path = os.path.join(out_dir, name + ".md")
    checkpoint.atomic_write_bytes(md_path, self.to_markdown().encode("utf-8"))
    html_path = None
    if html_page:
      html_path = os.path.join(out_dir, name + ".html")
      checkpoint.atomic_write_bytes(html_path, self.to_html(out_dir).encode("utf-8"))
    return md_path, html_path
