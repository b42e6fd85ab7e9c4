"""Sample images with a Stable Diffusion checkpoint: see configs/sample.py for the fields and examples.

    python sample.py --config configs/sample.py --config.checkpoint=PATH --config.prompt="a red fox in snow"
"""
from absl import app
from ml_collections import config_flags

from sdjax import cli

_CONFIG = config_flags.DEFINE_config_file("config", "configs/sample.py", "sampling config file")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; settings go in --config.FIELD=VALUE")
    from sdjax import jobs

    if _CONFIG.value.distributed:  # one process per host; the cluster tells each its id and the coordinator
        import jax

        try:
            jax.distributed.initialize()
        except ValueError as e:  # no cluster that jax recognises
            cli.fail("sample.py", f"--config.distributed=True: {e} jax.distributed.initialize() reads the "
                     "coordinator, the process count and this process's id from SLURM, Open MPI, Kubernetes or "
                     "Cloud TPU: launch one process per host through one of them")
    try:
        jobs.run(_CONFIG.value)
    except jobs.ConfigError as e:
        cli.fail("sample.py", str(e))


if __name__ == "__main__":
    cli.run(main, prog="sample.py")
