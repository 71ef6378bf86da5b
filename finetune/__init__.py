"""Dolly's fine-tuning recipe: ``dolly-finetune`` (:mod:`finetune.train`, launch commands in its docstring).

The file list is the pipeline: :mod:`finetune.data` (records -> Dolly's training text -> tokens and completion
mask), :mod:`finetune.common` (the flags and what training and planning share),
:mod:`finetune.train` (TRL SFTTrainer, LoRA/QLoRA via PEFT, DeepSpeed, checkpoints, atomic final save, MLflow),
:mod:`finetune.presets` and ``finetune/configs/`` (Dolly's published runs and DeepSpeed configs) and
:mod:`finetune.plan` (what to launch on given hardware).
"""
