"""Model selection by an evaluation metric, as the official CIFAR-10 fine-tuning does.

`finetune_cifar10.py` saves a checkpoint only when the smoothed r = 0 accuracy (majority
vote of 100 noise draws) on every 10th test image improves, so the model it certifies is
selected on the test set. `BestExport` does the same: `<workdir>/best/export` holds the
parameters of the best value seen so far (ties keep the earlier one), and its meta records
the metric, value and step, so a resumed run continues from that best. The last parameters
still go to `<workdir>/export`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from typing import Any

from etils import epath

from dmae_jax import exports

SELECTIONS = ("last", "best_vote")


class BestExport:
    """Keeps `<workdir>/best/export` = the parameters with the highest `metric` so far."""

    def __init__(self, workdir: str, meta: Mapping[str, Any],
                 transform: Callable[[Any], Any] = lambda params: params,
                 metric: str = "eval_vote_acc"):
        """`meta` is the export's meta; `transform(params)` gives the parameters to export."""
        self.transform = transform
        self.workdir = os.path.join(os.fspath(workdir), "best")
        self.path = epath.Path(self.workdir) / "export"
        self.meta = dict(meta)
        self.metric = metric
        self.best = -math.inf
        if (self.path / "meta.json").exists():
            previous = exports.read_meta(self.path, kind=self.meta["kind"],
                                         field=f"{self.path} (the best export so far)"
                                         ).get("selection", {})
            if previous.get("metric") == metric:
                self.best = float(previous["value"])

    def update(self, step: int, value: float, params: Any) -> bool:
        """Exports `params` (global arrays) if `value` beats the best so far; True if it did."""
        if not value > self.best:
            return False
        self.best = float(value)
        selection = {"metric": self.metric, "value": self.best, "step": int(step)}
        exports.save_final(self.workdir, self.transform(params),
                           {**self.meta, "selection": selection})
        return True
