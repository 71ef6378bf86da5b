"""What ``dolly-eval`` (:mod:`finetune.evaluate`) is made of, in the order it runs.

- :mod:`finetune.evaluation.taskdata`: the card's evaluation sets from their authors' original files, converted to
  the rows of the hub datasets lm-eval loads.
- :mod:`finetune.evaluation.harness`: lm-evaluation-harness with its official task definitions on those rows,
  seeded samples, the model fingerprint and the cache.
- :mod:`finetune.evaluation.card`: the card's tasks, metrics and published rows; the table, ``results.json`` rows
  and the chart.
- :mod:`finetune.evaluation.generation`: instruction following on held-out dolly-15k through ``DollyLLM``
  (ROUGE-L, answers that ended by themselves, length, per category) and the held-out split record of a run.
"""
