import numpy as np
import pytest

from intriguing_jax import plotting
from intriguing_jax import report


def test_markdown_table_formats_and_escapes():
  rows = [{"model": "a|b", "err": 0.12345, "ok": True}, {"model": "c", "err": float("nan")}]
  text = plotting.markdown_table(rows, floatfmt=".2f")
  lines = text.strip().split("\n")
  assert lines[0] == "| model | err | ok |"
  assert lines[2] == "| a\\|b | 0.12 | yes |"
  assert lines[3] == "| c | n/a |  |"


def test_image_grid_and_histogram_are_png(tmp_path):
  imgs = np.random.RandomState(0).rand(7, 5, 5, 1)
  p = plotting.save_image_grid(imgs, str(tmp_path / "g.png"), ncols=3, titles=list("abcdefg"))
  assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  p = plotting.save_histograms({"a": np.arange(10.0), "b": np.ones(3)}, str(tmp_path / "h.png"))
  assert open(p, "rb").read(4) == b"\x89PNG"
  with pytest.raises(ValueError, match="expected"):
    plotting.save_image_grid(np.zeros((3,)), str(tmp_path / "bad.png"))


def test_triplets_and_pairs_layout():
  x = np.zeros((6, 2, 2, 1), np.float32)
  xa = x + 0.01
  t = plotting.adversarial_triplets(x, xa, magnify=10)
  assert t.shape == (6, 3, 2, 2, 1)
  np.testing.assert_allclose(t[:, 1], 0.6, rtol=1e-6)
  g = plotting.pairs_grid(x, xa, ncols_pairs=3)
  assert g.shape == (2, 6, 2, 2, 1)
  np.testing.assert_allclose(g[0, 1], xa[0])
  np.testing.assert_allclose(g[1, 2], x[4])
  assert plotting.safe_name("FC100-100-10'") != plotting.safe_name("FC100-100-10")  # distinct stay distinct
  assert plotting.safe_name("a/b c").startswith("a_b_c_")


def test_report_writes_every_block(tmp_path):
  plotting.save_image_grid(np.ones((2, 3, 3)), str(tmp_path / "fig.png"))
  rep = report.Report("Title")
  rep.heading("Table 1")
  rep.table([{"model": "FC10", "error": 0.07}], caption="cap")
  rep.image("fig.png", caption="a figure")
  rep.bullets(["one", "two"])
  md, html_path = rep.write(str(tmp_path), "r")
  md_text = open(md).read()
  assert "## Table 1" in md_text and "| FC10 | 0.07 |" in md_text and "![a figure](fig.png)" in md_text
  html_text = open(html_path).read()
  assert "data:image/png;base64," in html_text and "<td>FC10</td>" in html_text
