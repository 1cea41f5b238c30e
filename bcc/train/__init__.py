"""Training: `fit(cfg)` and the stages it strings together, one module each.

setup.py   components built once (model, groups, stages, loss, optimizer, LR), shared with bench/compare
epoch.py   `train_step`, `train_one_epoch`, `evaluate` as free functions
resume.py  which checkpoint to continue, whether the config may, restoring it
runlog.py  metrics.jsonl rows and trackers (`RunLog.log(row, step)`), the progress bar or lines
preempt.py the preemption flag and the PREEMPTED marker
fit.py     `fit(cfg)` (import it as `from bcc.train.fit import fit`)
`python -m bcc.train` runs __main__.py, whose parser lives in bcc/cli/train.py.
"""

from __future__ import annotations
