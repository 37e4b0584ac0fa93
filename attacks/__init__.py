"""The attack harness: what each method actually leaks, next to the ε it claims.

Canaries, the memorization attack, the one-run audit and label inference land here
(issue 4). Attacks read run folders written by :mod:`labeldp.runner`.
"""
