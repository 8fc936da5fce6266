"""The label overlay's outlines (learnsim.evaluation.figures._outline): the lines matplotlib's contour draws."""

from __future__ import annotations

import numpy as np
from matplotlib.collections import LineCollection
from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

from learnsim.evaluation.figures import _outline


def _key(lines):
    return sorted((len(ln), tuple(np.round(ln, 6).ravel()[:8])) for ln in lines)


def test_outline_draws_exactly_the_contour_lines_of_each_structure():
    rng = np.random.default_rng(0)
    cut = np.zeros((40, 50), dtype=np.int64)
    cut[5:20, 8:30] = 3
    cut[22:35, 10:18] = 7
    cut[25:28, 30:45] = 7  # a structure in two pieces: two lines of one colour
    cut[rng.random(cut.shape) < 0.02] = 9  # specks
    colours = {3: (1.0, 0.0, 0.0), 7: (0.0, 1.0, 0.0), 9: (0.0, 0.0, 1.0), 11: (1.0, 1.0, 0.0)}
    ax = Figure().add_subplot()
    _outline(ax, cut, [3, 7, 9, 11], lambda k: colours[k], linewidths=1.5)  # 11 is absent: nothing drawn
    (coll,) = [c for c in ax.collections if isinstance(c, LineCollection)]
    ours = coll.get_segments()
    expected, expected_colours = [], []
    ref = Figure().add_subplot()
    for label in (3, 7, 9):
        cs = ref.contour((cut == label).astype(np.float32), levels=[0.5])
        lines = [ln for ln in cs.allsegs[0] if len(ln) > 1]
        expected += lines
        expected_colours += [to_rgba(colours[label])] * len(lines)
    assert len(ours) == len(expected) and _key(ours) == _key(expected)
    got = sorted(map(tuple, coll.get_colors()))
    assert got == sorted(expected_colours)
    assert np.allclose(coll.get_linewidths(), 1.5)
