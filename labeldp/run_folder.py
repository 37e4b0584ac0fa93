"""The layout of a run folder: what its privacy guarantee covers, and what it does not.

Covered by the run's ε (under its neighbouring relation, and — with seeded noise — only
while the run seed is secret):

- ``config.json``: what was asked for (public choices) and the run's noise key (a hash
  of the configuration, kept so that a resumed run draws the noise it started with);
- ``model.pt``: the released model;
- ``<name>.noisy.pt``: the output of a label mechanism, drawn once (the privatized labels
  of RR, ALIBI and LP-MST's stages, PATE's released answers and the query pool);
- ``metrics.json`` apart from its ``diagnostics`` key: test accuracy and training
  history (post-processing of the model and of the privatized labels), ε, δ, the ledger;
- ``*.ckpt`` while the run is unfinished: intermediate models of the same training;
- ``.lock``: the run's lock file (:mod:`labeldp.locking`).

Not covered — evaluation diagnostics computed from the raw private labels, in one place,
:data:`DIAGNOSTICS` (``diagnostics/``), and under the ``diagnostics`` key of
``metrics.json`` and of the results store:

- ``diagnostics/outputs.pt``: the model's outputs on a sample of training examples with
  their *true* labels (label inference), and on canaries and controls;
- ``diagnostics/canaries.pt``: which examples are canaries, their true and planted labels;
- ``diagnostics/pate_votes.pt`` and the teachers' vote caches and checkpoints: raw teacher
  vote histograms and teachers trained on true labels; ``pate_teacher_accuracy.pt`` and
  the caches' ``teacher-accuracy-*.pt`` (each teacher's accuracy on the evaluation split);
  ``ceiling-student.ckpt`` (while it trains: PATE's ceiling student, trained on the true
  labels of the answered queries);
- ``metrics.json["diagnostics"]``: statistics against the true labels (e.g. the accuracy
  of PATE's answered labels, its data-dependent ε) and the MD5s of the data files (which
  hash the raw training labels).

Never publish ``diagnostics/`` (or a sweep's shared folder, which holds teacher votes)
with a run: they are what the attacks and the researcher compare against, not a release.
"""

from __future__ import annotations

from pathlib import Path

from .io import atomic_write_text

#: The folder of a run (and of a sweep's shared folder) that the guarantee does not cover.
DIAGNOSTICS = "diagnostics"

NOTICE = (
    "NOT COVERED BY THE PRIVACY GUARANTEE.\n"
    "Files here are evaluation diagnostics computed from the raw private labels (true\n"
    "labels, raw teacher votes, teachers trained on true labels). Do not publish them\n"
    "with the run. See labeldp/run_folder.py for what the guarantee covers.\n"
)


def diagnostics_dir(folder: str | Path) -> Path:
    """``<folder>/diagnostics``, created with its NOTICE.txt when absent."""
    path = Path(folder) / DIAGNOSTICS
    path.mkdir(parents=True, exist_ok=True)
    if not (path / "NOTICE.txt").exists():
        atomic_write_text(path / "NOTICE.txt", NOTICE)
    return path


def diagnostic_file(run_dir: str | Path, name: str) -> Path:
    """Where the diagnostic ``name`` of a run lives: ``diagnostics/<name>``, or the run
    folder itself for runs made before the split (read-only fallback)."""
    path = Path(run_dir) / DIAGNOSTICS / name
    legacy = Path(run_dir) / name
    return legacy if not path.exists() and legacy.exists() else path
