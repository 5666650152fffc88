# my_package/sharpness.py
import numpy as np

from cockpit_lite import Instrument, Need
from cockpit_lite.panels import LinePanel, Panel


class RatioHistogram(Panel):
    """A drawing of your own: the histogram of every ratio so far."""

    title = "Grad norm ratio over the run"
    xlabel = "max_i ||g_i|| / ||gbar||"
    ylabel = "tracked steps"

    def setup(self, ax):  # once, when the panel gets its axes
        self._bars = []

    def update(self, history):  # at every redraw
        self.clear_patches("_bars")
        _, ratios = self.series(history, "my/grad_norm_ratio")
        ratios = ratios[np.isfinite(ratios)]
        if not self.shows(ratios.size):  # nothing yet: the panel says why
            return
        counts, edges = np.histogram(ratios, bins=20)
        self._bars = [self.ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge")]
        self.rescale()


class GradNormRatio(Instrument):
    """max_i ||g_i|| / ||gbar||: how much one sample can dominate the step."""

    NEEDS = frozenset({Need.PER_SAMPLE_SQ_NORMS, Need.PER_SAMPLE_DOT_MEAN})

    TAGS = {"my/grad_norm_ratio": "max_i ||g_i|| / ||gbar||"}
    PANELS = (
        LinePanel("One sample's pull", ["my/grad_norm_ratio"], ylabel="max_i ||g_i|| / ||gbar||"),
        RatioHistogram(),
    )
    CHARTS = {"My instruments": {"grad norm ratio": ["Multiline", ["^my/grad_norm_ratio$"]]}}
    SUMMARY = [("my/grad_norm_ratio", "largest sample / batch gradient")]

    def compute(self, record):
        ratio = np.sqrt(record.per_sample_sq_norms.max() / record.mean_grad_sq_norm)
        return {self.tag("my/grad_norm_ratio"): ratio}
