"""Sample images with a Stable Diffusion checkpoint: see configs/sample.py for the fields and examples.

    python sample.py --config configs/sample.py --config.checkpoint=PATH --config.prompt="a red fox in snow"
"""
import sys

from absl import app
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/sample.py", "sampling config file")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; settings go in --config.FIELD=VALUE")
    from sdjax import jobs

    if _CONFIG.value.distributed:  # one process per host; coordinator from the cluster or JAX_COORDINATOR_ADDRESS
        import jax

        jax.distributed.initialize()
    try:
        jobs.run(_CONFIG.value)
    except jobs.ConfigError as e:
        print(f"sample.py: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
