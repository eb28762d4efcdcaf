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


def _capture(monkeypatch):
  """Records every figure saved by plotting (then saves it as usual)."""
  figs, save = [], plotting._save_figure
  monkeypatch.setattr(plotting, "_save_figure", lambda fig, path: (figs.append(fig), save(fig, path))[1])
  return figs


def test_image_grid_and_histogram_are_png(tmp_path, monkeypatch):
  figs = _capture(monkeypatch)
  imgs = np.random.RandomState(0).rand(7, 5, 5, 1)
  p = plotting.save_image_grid(imgs, str(tmp_path / "g.png"), ncols=3, titles=list("abcdefg"),
                               captions=["", "true 1 > target 2\npred 2"])
  assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
  axes = figs[-1].axes
  assert [ax.get_title() for ax in axes[:7]] == list("abcdefg")
  assert [ax.get_xlabel() for ax in axes[:3]] == ["", "true 1 > target 2\npred 2", ""]
  p = plotting.save_histograms({"a": np.arange(10.0), "b": np.ones(3)}, str(tmp_path / "h.png"))
  assert open(p, "rb").read(4) == b"\x89PNG"
  assert all(patch.get_fill() is False for patch in figs[-1].axes[0].patches)  # outlines, not filled bars
  with pytest.raises(ValueError, match="expected"):
    plotting.save_image_grid(np.zeros((3,)), str(tmp_path / "bad.png"))


def test_difference_grid_uses_one_symmetric_diverging_scale(tmp_path, monkeypatch):
  figs = _capture(monkeypatch)
  rng = np.random.RandomState(0)
  x = rng.rand(2, 3, 5, 5, 1).astype(np.float32)  # 2 rows (models) x 3 examples
  x_adv = x.copy()
  x_adv[0, 0, 1, 1, 0] += 0.3   # the largest |diff| of the figure, in row 0
  x_adv[1, 2, 2, 2, 0] -= 0.05  # row 1 only has a small, negative difference
  caps = [f"c{i}" for i in range(6)]
  p = plotting.save_difference_grid(x, x_adv, str(tmp_path / "d.png"), row_labels=["m0", "m1"], captions=caps)
  assert open(p, "rb").read(4) == b"\x89PNG"
  fig = figs[-1]
  grid = [ax for ax in fig.axes if ax.images and ax.get_label() != "<colorbar>"]
  assert len(grid) == 18 and len(fig.axes) == 19  # 2 x 3 x (original, difference, adversarial) + colorbar
  diffs = [ax.images[0] for ax in grid[1::3]]
  assert all(im.get_cmap().name == "RdBu_r" for im in diffs)
  for im in diffs:  # one symmetric scale for the whole figure, vmax = max |diff|
    assert im.norm.vmin == pytest.approx(-0.3, abs=1e-6) and im.norm.vmax == pytest.approx(0.3, abs=1e-6)
  assert all(ax.images[0].get_cmap().name == "gray" for ax in grid[0::3] + grid[2::3])
  assert [ax.get_xlabel() for ax in grid[2::3]] == caps  # a caption under each adversarial image
  assert grid[0].get_ylabel() == "m0" and grid[9].get_ylabel() == "m1"
  with pytest.raises(ValueError, match="equal"):
    plotting.save_difference_grid(x, x_adv[:1], str(tmp_path / "bad.png"))


def test_cdfs_one_step_curve_per_series(tmp_path, monkeypatch):
  figs = _capture(monkeypatch)
  series = {"a": np.array([0.3, 0.1, 0.2, np.nan]), "b": np.array([0.5, 0.5]), "c": np.array([0.05])}
  p = plotting.save_cdfs(series, str(tmp_path / "c.png"), xlabel="RMS distortion")
  assert open(p, "rb").read(4) == b"\x89PNG"
  ax = figs[-1].axes[0]
  assert len(ax.lines) == 3 and all(l.get_drawstyle() == "steps-post" for l in ax.lines)
  labels = [t.get_text() for t in ax.get_legend().get_texts()]
  assert labels[0].startswith("a (n=4, median 0.2, 1 non-finite") and labels[1].startswith("b (n=2")
  xs, ys = ax.lines[0].get_data()
  np.testing.assert_allclose(xs, [0.1, 0.1, 0.2, 0.3])
  np.testing.assert_allclose(ys, [0.0, 0.25, 0.5, 0.75])  # the NaN keeps the curve below 1
  np.testing.assert_allclose(ax.lines[1].get_data()[1], [0.0, 0.5, 1.0])
  with pytest.raises(ValueError, match="no series"):
    plotting.save_cdfs({}, str(tmp_path / "e.png"))


def test_pairs_layout():
  x = np.zeros((6, 2, 2, 1), np.float32)
  xa = x + 0.01
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
