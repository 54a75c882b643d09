"""Compiles a preset's sharded train step for a TPU topology on a CPU machine and prints per-chip memory.

    pip install -e '.[tpu]'
    JAX_PLATFORMS=cpu python scripts/aot_compile.py --config=configs/transformer.py:350m --topology=v5p:2x2x2

Mesh axes come from the config (`--config.mesh.fsdp=8 --config.mesh.data=1`). Exits 1 if it does not fit.
"""

import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # quiets libtpu's probing on a CPU machine
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from lcjax.config import from_config_dict  # noqa: E402
from lcjax.errors import ConfigError  # noqa: E402
from lcjax.train.aot import GIB, compile_train_step  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config and preset.", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", "v5e:2x2", "TPU topology name, e.g. v5e:2x2, v5p:2x2x2, v5p:4x4x4.")
_OUT = flags.DEFINE_string("out", "", "Optional JSON output path.")


def main(argv):
    del argv
    try:
        report = compile_train_step(from_config_dict(_CONFIG.value), _TOPOLOGY.value)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(
        f"{report['topology']} ({report['device_kind']}, {report['chips']} chips), mesh {report['mesh']}, "
        f"{report['params'] / 1e6:.1f}M params"
    )
    if "error" in report:
        print(f"  does not fit: {report['error']}")
    for key in ("arguments", "outputs", "aliased", "temporaries", "total"):
        if key in report:
            print(f"  {key:<12}{report[key] / GIB:10.3f} GiB per chip")
    if report["hbm"]:
        verdict = "fits" if report["fits"] else "DOES NOT FIT"
        print(f"  {'HBM':<12}{report['hbm'] / GIB:10.3f} GiB per chip: {verdict}")
    if "pallas_kernel_calls" in report:
        print(f"  {'Pallas':<12}{report['pallas_kernel_calls']:10d} Mosaic kernel calls in the compiled step")
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(report, f, indent=2)
    sys.exit(0 if report["fits"] in (True, None) else 1)


if __name__ == "__main__":
    app.run(main)
