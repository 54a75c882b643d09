"""lcjax entry point: `python main.py --config=configs/<family>.py:<preset> --workdir=DIR [--mode=...]`.

Parses flags, validates the config (bad configs exit with status 2 before anything is compiled or written) and
calls the library. All logic lives in `lcjax`.
"""

import os
import sys
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Config file and preset: configs/<family>.py:<preset>", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: config, metrics, TensorBoard, checkpoints.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "generate", "export"], "What to do.")
_EXPORT_DIR = flags.DEFINE_string(
    "export_dir", "", "--mode=export: where to write the Hugging Face folder (config.json, safetensors, tokenizer)."
)
_PROMPT = flags.DEFINE_string("prompt", "", "Prompt for --mode=generate.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", "", "host:port of process 0 for multi-process runs (or JAX_COORDINATOR_ADDRESS)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Process count of a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index in a multi-process run.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "Initialize jax.distributed from the cluster environment (TPU pod slice, SLURM) without an explicit coordinator.",
)
_INIT_FROM = flags.DEFINE_string(
    "init_from",
    "",
    "Workdir or checkpoint directory to load parameters from "
    "when --workdir has no checkpoint (optimizer and step start fresh).",
)


_MULTI_PROCESS = []  # non-empty once jax.distributed is up with more than one process


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    _exit(2)


def _exit(code: int) -> None:
    """Exits; in a multi-process run without the shutdown barrier, where the other processes (blocked in a
    collective or barrier of their own) would keep this one waiting: they see it gone and stop instead."""
    if _MULTI_PROCESS:
        logging.flush()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _parse_flags(argv):
    """absl flag parsing that reports any error (unknown override key, bad preset) in one line, exit 2."""
    try:
        return flags.FLAGS(argv)
    except Exception as e:  # flags.Error, or whatever the config file's get_config raised
        root = e
        while root.__context__ is not None:
            root = root.__context__
        if isinstance(root, KeyError) and root.args:  # ml_collections: an override of a key the config lacks
            key = str(root.args[0]).split()[0].strip("'\"")
            flag = next((a.split("=")[0] for a in argv if a.startswith("--config.") and key in a), key)
            moved = " (attention settings are in the model section: --config.model.attention.*)"
            _fail(f"{flag}: unknown config key {key!r}" + (moved if key == "attention" else ""))
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        # A config file that raised comes wrapped with its traceback: its last line is the actual error.
        _fail(lines[-1] if "Traceback" in str(e) else lines[0])


def main(argv):
    from lcjax.train.metrics import quiet_library_logs

    quiet_library_logs()
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}")
    if _CONFIG.value is None:
        _fail("--config is required, e.g. --config=configs/transformer.py:tiny")
    if not _WORKDIR.value:
        _fail("--workdir is required")
    import jax

    from lcjax import config as config_lib
    from lcjax.errors import ConfigError
    from lcjax.experiments import inference
    from lcjax.parallel import distributed
    from lcjax.train import loop

    try:
        if (
            distributed.maybe_initialize(
                _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, auto=_DISTRIBUTED.value
            )
            and jax.process_count() > 1
        ):
            _MULTI_PROCESS.append(jax.process_index())
    except ValueError as e:
        _fail(f"--coordinator_address: {e}")
    try:
        config = config_lib.from_config_dict(_CONFIG.value).validate(jax.device_count())
        if _MODE.value == "train":
            result = loop.train(config, _WORKDIR.value, init_from=_INIT_FROM.value)
            print("final eval: " + "  ".join(f"{k} {v:.4f}" for k, v in result.items()))
        elif _MODE.value == "eval":
            report = inference.evaluate_checkpoint(config, _WORKDIR.value)
            line = {k: v for k, v in report.items() if isinstance(v, float) and not k.startswith("loss_pos/")}
            line |= {f"{t}/answer_accuracy": m["answer_accuracy"] for t, m in report["tasks"].items()}
            print(f"eval at step {report['step']}: " + "  ".join(f"{k} {v:.4f}" for k, v in line.items()))
            if "stream" in report:
                s = report["stream"]
                shown = {k: s[k] for k in ("loss", "bits_per_byte", "ms_per_token") if k in s}
                print(
                    f"stream of {s['tokens']} tokens (pieces of {s['piece']}, state {s['state_bytes']} bytes): "
                    + "  ".join(f"{k} {v:.4f}" for k, v in shown.items())
                )
        elif _MODE.value == "export":
            if not _EXPORT_DIR.value:
                _fail("--export_dir is required for --mode=export")
            from lcjax.export import export_checkpoint

            directory, step = export_checkpoint(config, _WORKDIR.value, _EXPORT_DIR.value)
            print(f"exported step {step} to {directory}")
        else:  # every process takes part; process 0 prints
            text = inference.generate_text(config, _WORKDIR.value, _PROMPT.value)
            if jax.process_index() == 0:
                print(_PROMPT.value + text)
    except ConfigError as e:
        _fail(str(e))
    except Exception:
        if not _MULTI_PROCESS:
            raise
        traceback.print_exc()
        _exit(1)
    logging.flush()


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
