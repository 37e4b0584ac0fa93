"""The attack harness: what each method actually leaks, next to the ε it claims.

- :mod:`attacks.canaries`: planting memorization and audit canaries (done by the runner
  before any method sees a label);
- :mod:`attacks.stats`: exact binomial / Clopper–Pearson statistics and ε lower bounds;
- :mod:`attacks.memorization`: the memorization attack with a held-out threshold;
- :mod:`attacks.one_run`: the one-run audit (Steinke et al. 2023);
- :mod:`attacks.label_inference`: label inference and its gap (Wu et al. 2023);
- :mod:`attacks.harness`: runs them on run folders, writes attack.json, prints the table.
"""
