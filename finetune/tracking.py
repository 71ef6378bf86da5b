"""``dolly-finetune --report-to mlflow``: one MLflow run around training, ending with the final model's path."""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

from finetune.common import FinetuneError

logger = logging.getLogger("finetune")

__all__ = ["check_mlflow", "mlflow_run", "reports_to_mlflow"]


def reports_to_mlflow(args: argparse.Namespace) -> bool:
    return "mlflow" in [name.strip() for name in args.report_to.split(",")]


def check_mlflow(args: argparse.Namespace) -> None:
    """Refuse ``--report-to mlflow`` without MLflow installed, before anything is loaded."""
    if "mlflow" in args.report_to:
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise FinetuneError("--report-to mlflow needs MLflow: pip install 'dolly-langchain[mlflow]'.") from None


@contextlib.contextmanager
def mlflow_run(args: argparse.Namespace, trainer) -> Iterator[Callable[[Path], None]]:
    """With ``--report-to mlflow``: one MLflow run around training, holding the Trainer's params and metrics
    (transformers' MLflowCallback logs into the active run), ``dolly-finetune``'s own flags, and at the end the
    final model's path (``final_model_dir``). Yields a function to call with that path.

    The run is started here rather than by the callback, which ends its run when training ends, before the final
    model exists. ``MLFLOW_TRACKING_URI`` and ``MLFLOW_EXPERIMENT_NAME`` are read by MLflow itself.
    """
    if not reports_to_mlflow(args) or not trainer.is_world_process_zero():
        yield lambda final: None
        return
    import mlflow

    flags = {name: value for name, value in sorted(vars(args).items()) if not callable(value)}  # not the command's run
    with mlflow.start_run(run_name=Path(args.local_output_dir).name):
        mlflow.log_params({f"dolly_finetune.{name}": value for name, value in flags.items()})

        def record(final: Path) -> None:
            mlflow.log_param("final_model_dir", str(final.resolve()))
            mlflow.set_tag("final_model_dir", str(final.resolve()))
            logger.info("MLflow run %s: final model %s", mlflow.active_run().info.run_id, final)

        yield record
