"""Moved: the parts of ``dolly-eval`` are :mod:`dolly_langchain.evaluation`; these old module paths re-export them
(:mod:`finetune.evaluation.taskdata`, ``.harness``, ``.card``, ``.generation``)."""
