"""``python -m finetune ARGS`` is ``dolly-finetune ARGS`` (see :mod:`finetune.train` for launch commands)."""

from finetune.train import main

if __name__ == "__main__":
    raise SystemExit(main())
