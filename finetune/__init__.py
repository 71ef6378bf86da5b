"""Dolly's fine-tuning recipe: ``dolly finetune`` / ``dolly-finetune`` (:mod:`finetune.train`, launch commands in
its docstring).

The file list is the pipeline: :mod:`finetune.data` (records -> Dolly's training text -> tokens and completion
mask -> the held-out split), :mod:`finetune.common` (the flags and what training, data and planning share),
:mod:`finetune.train` (the entry point and the trainer: TRL SFTTrainer, LoRA/QLoRA via PEFT, DeepSpeed),
:mod:`finetune.rundir` (the run directory: checks, checkpoints, the atomic final model, the export copy),
:mod:`finetune.workarounds` (each upstream behaviour worked around, with its issue), :mod:`finetune.tracking`
(MLflow), :mod:`finetune.presets` and ``finetune/configs/`` (Dolly's published runs and DeepSpeed configs),
:mod:`finetune.plan` (what to launch on given hardware) and :mod:`finetune.cli` (both in the ``dolly`` command tree).
"""
