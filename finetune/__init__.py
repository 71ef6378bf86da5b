"""Dolly's fine-tuning recipe: ``dolly-finetune`` (:mod:`finetune.train`, launch commands in its docstring).

The file list is the pipeline: :mod:`finetune.data` (records -> Dolly's training text -> tokens and completion
mask), :mod:`finetune.train` (CLI, TRL SFTTrainer, DeepSpeed, checkpoints, atomic final save),
:mod:`finetune.presets` and ``finetune/configs/`` (Dolly's published runs and DeepSpeed configs) and
:mod:`finetune.plan` (what to launch on given hardware).
"""
