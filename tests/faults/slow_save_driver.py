"""Train the tiny model, making the checkpoint at STEP hang before its final rename.

Usage: python slow_save_driver.py CONFIG_FILE WORKDIR STEP MARKER [SECONDS]
Orbax writes a step into a temporary directory and renames it when complete; this driver
delays that rename by SECONDS (default 600; after touching MARKER) so the test can signal or
SIGKILL the process mid-save.
"""

import asyncio
import importlib.util
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2]))

from orbax.checkpoint._src.path import async_path  # noqa: E402

from finetune_jax.train import train  # noqa: E402


def main(config_file, workdir, step, marker, seconds="600"):
    real_rename = async_path.rename

    async def slow_rename(src, dst):
        if pathlib.Path(dst).name == step:
            pathlib.Path(marker).touch()
            await asyncio.sleep(float(seconds))
        return await real_rename(src, dst)

    async_path.rename = slow_rename
    spec = importlib.util.spec_from_file_location("config", config_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    train(module.get_config(), workdir)


if __name__ == "__main__":
    main(*sys.argv[1:])
