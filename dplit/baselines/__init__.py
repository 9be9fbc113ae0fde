"""NON-private scikit-learn baselines (gradient boosting, a soft-voting ensemble) on a dplit config's data.

They train on the same training split, are scored with the same ``dplit.metrics`` functions and names as
:class:`~dplit.callbacks.SubgroupMetrics`, and write the run format of ``dplit fit`` so ``dplit report`` shows them
beside neural runs. They are NOT differentially private: compare them with DP runs knowing that they spend no
privacy budget (and their preprocessing is the config's ``data`` section, the same as the neural runs').
"""

from dplit.baselines.evaluate import group_metrics
from dplit.baselines.models import BASELINES, make_baseline, register_baseline
from dplit.baselines.runs import write_run

__all__ = ["BASELINES", "group_metrics", "make_baseline", "register_baseline", "write_run"]
