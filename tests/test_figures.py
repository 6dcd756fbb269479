"""Figures: tick labels of the symmetric-log axes read as numbers with mathtext off."""

from __future__ import annotations

from prunebias_jax import report


def test_symlog_ticks_are_plain_numbers_when_mathtext_is_off():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  @report._literal_text
  def labels(use_helper: bool) -> list[str]:
    fig, ax = plt.subplots()
    ax.plot([-5000, 0, 20000], [1, 2, 3])
    if use_helper:
      report._symlog(ax, "x", 10.0)
    else:
      ax.set_xscale("symlog", linthresh=10.0)
    fig.canvas.draw()
    out = [t.get_text() for t in ax.get_xticklabels()]
    plt.close(fig)
    return out

  assert any("mathdefault" in t for t in labels(False))  # what the figures showed before
  got = labels(True)
  assert not any("$" in t for t in got)
  assert {"-1e3", "0", "10", "1e4"} <= set(got)
